"""moe_core: the shared core of moe-inference-server (config, storage, model loading, engine).

Imports no Ray Serve code; both ``deployments`` and ``merge_jobs`` build on it.
"""

from moe_core.config import BUILTIN_TINY, ConfigError, DeploymentConfig
from moe_core.engine import ClassifyResult, Engine, EngineError, GenerationRequest, GenerationResult
from moe_core.registry import AdapterRejected, deploy_adapter, list_adapters
from moe_core.storage import Storage, StorageError

__all__ = [
    "BUILTIN_TINY",
    "AdapterRejected",
    "ClassifyResult",
    "ConfigError",
    "DeploymentConfig",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "Storage",
    "StorageError",
    "deploy_adapter",
    "list_adapters",
]
