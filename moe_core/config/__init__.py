"""Typed configuration: `config/deployment.yaml` decides what is merged and what is dynamic.

Every model derives from :class:`StrictModel` (``extra="forbid"``, a description on every field), so a
misspelled key or a bad value fails at load with pydantic's field location and the offending value.

This package is the configuration's interface: import from ``moe_core.config``. Its modules:

- :mod:`moe_core.config.base`: :class:`StrictModel`, :class:`ConfigError`, adapter names, and
  :class:`LiveFields`, the mark of a live field.
- The file schema: :mod:`moe_core.config.schema` (:class:`DeploymentConfig`, the file as a whole,
  :data:`LIVE_FIELDS`) and its sections: :mod:`moe_core.config.sections` (the Serve graph's: routing, the
  deployments, promotion, the gateway, the API), :mod:`moe_core.config.model` (a model's: the base model,
  limits, the engine, output grammars, the merge job) and :mod:`moe_core.config.storage`.
- The runtime models: :mod:`moe_core.config.runtime` (:class:`EngineSettings`, each deployment's live
  settings, built from the live fields the sections declare).
"""

from moe_core.config.base import (
    ADAPTER_NAME_RE,
    AdapterName,
    ConfigError,
    LiveFields,
    StrictModel,
    validate_adapter_name,
)
from moe_core.config.model import (
    BUILTIN_TINY,
    CPU_KV_CACHE_BYTES,
    IMAGE_FORMATS,
    BaseModelConfig,
    EngineConfig,
    LimitsConfig,
    MergeJobConfig,
    OutputGrammar,
)
from moe_core.config.runtime import (
    DynamicLive,
    EngineSettings,
    GatewayLive,
    LiveModel,
    LiveSettings,
    PromotionLive,
)
from moe_core.config.schema import DEFAULT_SYSTEM_PROMPT, LIVE_FIELDS, DeploymentConfig
from moe_core.config.sections import (
    ApiConfig,
    BatchingConfig,
    DynamicConfig,
    FullModelConfig,
    GatewayConfig,
    MergedAdapterConfig,
    MergedConfig,
    PromotionConfig,
    RouterConfig,
    ScalingConfig,
)
from moe_core.config.storage import S3_SCHEMES, StorageConfig

__all__ = [
    "ADAPTER_NAME_RE",
    "BUILTIN_TINY",
    "CPU_KV_CACHE_BYTES",
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_FORMATS",
    "LIVE_FIELDS",
    "S3_SCHEMES",
    "AdapterName",
    "ApiConfig",
    "BaseModelConfig",
    "BatchingConfig",
    "ConfigError",
    "DeploymentConfig",
    "DynamicConfig",
    "DynamicLive",
    "EngineConfig",
    "EngineSettings",
    "FullModelConfig",
    "GatewayConfig",
    "GatewayLive",
    "LimitsConfig",
    "LiveFields",
    "LiveModel",
    "LiveSettings",
    "MergeJobConfig",
    "MergedAdapterConfig",
    "MergedConfig",
    "OutputGrammar",
    "PromotionConfig",
    "PromotionLive",
    "RouterConfig",
    "ScalingConfig",
    "StorageConfig",
    "StrictModel",
    "validate_adapter_name",
]
