"""Session fixtures: the real tiny Qwen3-VL and small real LoRA adapters trained-by-construction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from moe_core.config import DeploymentConfig
from tests.helpers import make_lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from moe_core.tiny import build_tiny_model

    return build_tiny_model()


@pytest.fixture
def cfg(tmp_path: Path, tiny_path: Path) -> DeploymentConfig:
    """A config on the built-in tiny model with storage in a fresh temporary folder."""
    return DeploymentConfig.from_dict(
        {
            "storage": {"url": str(tmp_path / "storage"), "keep_versions": 2},
            "router": {"adapter": "router", "labels": {0: "alpha", 1: "beta"}},
            "merged": {"adapters": [{"name": "alpha"}]},
            "dynamic": {"adapters": ["beta", "gamma"]},
        }
    )


@pytest.fixture(scope="session")
def loras(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> dict[str, Path]:
    """Three random (non-zero) LoRA adapters on the tiny model; 'gamma' also adapts lm_head."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "alpha": make_lora(root / "alpha", seed=1),
        "beta": make_lora(root / "beta", seed=2),
        "gamma": make_lora(root / "gamma", seed=3, lm_head=True),
    }
