"""Loading the base model and its processor: a Hugging Face id, a local folder or the built-in tiny model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from moe_core.config import BUILTIN_TINY, BaseModelConfig

__all__ = [
    "LM_TARGETS",
    "SERVED_TARGETS",
    "VISION_TARGETS",
    "base_model_id",
    "load_model",
    "load_processor",
    "module_shapes",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

#: The language model's linears of Qwen3-VL.
LM_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
#: The vision tower's linears (its blocks; not the patch merger), where an adapter may also adapt
#: how the screen is seen: the engine applies them per image, so such adapters share mixed batches too.
VISION_TARGETS = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2))"
#: Where served adapters may put LoRA weights: the language model's and the vision tower's linears
#: and the LM head.
SERVED_TARGETS = LM_TARGETS + "|" + VISION_TARGETS + "|lm_head"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: BaseModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: BaseModelConfig, device: torch.device | None = None) -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU, unless the config names one."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    device = device or resolve_device(cfg)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_model_path(cfg: BaseModelConfig) -> str:
    """A local folder or hub id that ``from_pretrained`` understands; builds the tiny model if asked."""
    if cfg.id == BUILTIN_TINY:
        from moe_core.tiny import build_tiny_model

        return str(build_tiny_model())
    return cfg.id


def base_model_id(cfg: BaseModelConfig) -> str:
    """The identity adapters are checked against: the configured id, not where it happens to be cached."""
    return cfg.id


def _hub_kwargs(cfg: BaseModelConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    return kw


def load_processor(cfg: BaseModelConfig, path: str | Path | None = None) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path or resolve_model_path(cfg)), **_hub_kwargs(cfg))
    processor.tokenizer.padding_side = "left"  # batched generation pads on the left
    return processor


def load_model(
    cfg: BaseModelConfig,
    path: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Any:
    """Load a Qwen3-VL (or any image-text-to-text model) for inference, in eval mode."""
    from transformers import AutoModelForImageTextToText

    device = device or resolve_device(cfg)
    dtype = dtype or resolve_dtype(cfg, device)
    source = str(path or resolve_model_path(cfg))
    t0 = time.perf_counter()
    # device_map puts each weight on the device as it is read (through accelerate): an 8B checkpoint
    # never sits whole in host memory on the way to the GPU
    model = AutoModelForImageTextToText.from_pretrained(
        source,
        dtype=dtype,
        device_map=str(device),
        attn_implementation=cfg.attn_implementation,
        **_hub_kwargs(cfg),
    )
    model.eval()
    logger.info("loaded model %s (%s, %s) in %.2fs", source, dtype, device, time.perf_counter() - t0)
    return model


def module_shapes(
    cfg: BaseModelConfig, path: str | Path | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every module of the base model by name: (class name, weight shape), built on the meta device.

    Costs no memory even for the 8B model, so the adapter registry can check that each LoRA tensor
    lands on a real module with matching shapes.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(path or resolve_model_path(cfg)), **_hub_kwargs(cfg))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=cfg.trust_remote_code)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        out[name] = (type(mod).__name__, tuple(w.shape) if isinstance(w, torch.Tensor) else ())
    return out
