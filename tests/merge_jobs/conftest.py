from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_core.config import DeploymentConfig
from moe_core.probes import publish_probes
from moe_core.registry import deploy_adapter
from moe_core.storage.store import Storage
from tests.helpers import PROBES


@pytest.fixture
def merge_cfg(tmp_path: Path, loras: dict[str, Path]) -> tuple[DeploymentConfig, Path]:
    """A config whose storage holds adapter 'alpha', marked merged, and a default probe set; returns
    (config, its YAML file)."""
    cfg = DeploymentConfig.from_dict(
        {
            "storage": {"url": str(tmp_path / "storage"), "keep_versions": 3},
            "router": {"adapter": None},
            "merged": {"adapters": [{"name": "alpha"}]},
            "dynamic": {"adapters": ["beta"]},
            "merge": {"num_probes": 4},
            "limits": {"max_new_tokens": 8},
        }
    )
    deploy_adapter(Storage(cfg.storage.url), cfg, "alpha", loras["alpha"])
    publish_probes(Storage(cfg.storage.url), cfg.merge.probe_set, PROBES)
    path = tmp_path / "deployment.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return cfg, path
