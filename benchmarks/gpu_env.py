"""What the GPU benchmark needs from the Python it runs in, checked before any work (standard library only).

The GPU machine has Python 3.12, torch 2.11, transformers 5.17, peft and accelerate, and no Ray, no
pydantic, no qwen-vl-utils: the project's wheels travel with the run (``../shared/gpu/prepare-wheels.sh``
and the line it prints; see :mod:`benchmarks.gpu`). This module says, in one message, what is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

__all__ = ["HBM_TB_S", "MIN_TRANSFORMERS", "check_transformers", "hbm_tb_s", "missing_modules"]

#: The engine needs transformers >= 5.24: Qwen3-VL's ``mm_encoder_outputs`` and the cache API it plugs into.
MIN_TRANSFORMERS = (5, 24)

#: Modules the --gpu path imports (directly or through moe_core.engine), by the distribution that has them.
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "peft": "peft",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "numpy": "numpy",
    "torchvision": "torchvision (qwen-vl-utils and Qwen3VLProcessor's video processor import it)",
    "requests": "requests (qwen-vl-utils imports it)",
    "qwen_vl_utils": "qwen-vl-utils",
    "llguidance": "llguidance (moe_core.engine.constraints imports it)",
}

#: Peak HBM bandwidth (TB/s) by device name, first match wins; the default is the H100 SXM's.
HBM_TB_S: tuple[tuple[str, float], ...] = (
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100 NVL", 3.9),
    ("H100", 3.35),
    ("A100", 2.0),
)
DEFAULT_TB_S = 3.35

HOW_TO = (
    "ready the wheels with ../shared/gpu/prepare-wheels.sh (and the extra wheels named in benchmarks/gpu.py) "
    "and start the command with the line it prints (README: 'The GPU benchmark')"
)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def check_transformers(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the fix when transformers is older than :data:`MIN_TRANSFORMERS`."""
    if version is None:
        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            version = ""
    if not version or _version_tuple(version)[:2] < MIN_TRANSFORMERS:
        want = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(
            f"the GPU benchmark needs transformers >= {want} (the engine uses Qwen3-VL's mm_encoder_outputs "
            f"and the cache API), got {version or 'none'}; {HOW_TO}"
        )


def missing_modules() -> list[str]:
    """The distributions of :data:`REQUIRED` whose modules cannot be found (without importing them)."""
    return [dist for mod, dist in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def hbm_tb_s(device_name: str) -> float:
    """Peak memory bandwidth of the named device (TB/s); the H100 SXM's for an unknown or CPU device."""
    return next((tb for key, tb in HBM_TB_S if key in device_name), DEFAULT_TB_S)
