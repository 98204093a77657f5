"""The GPU benchmark's model and adapters: Qwen3-VL shapes built with random weights directly in their
serving dtype on the device, random PEFT-format LoRA adapters (non-zero B), a merge folded in place, and
the bytes a decode step reads (the bandwidth floor's numerator)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_core.modeling import LM_TARGETS

__all__ = [
    "build_model",
    "decode_weight_bytes",
    "fold_adapter",
    "lora_read_bytes",
    "qwen3_vl_8b_config",
    "tiny_config",
    "write_adapters",
]


def qwen3_vl_8b_config(tokenizer: Any) -> Any:
    """Qwen3-VL-8B-Instruct's shapes, with the special-token ids of ``tokenizer`` (the tiny model's)."""
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config={
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 4096,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_config(folder: Path) -> Any:
    """The embedded tiny model's shapes (its config.json), for the dry run."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(config: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Any:
    """A random Qwen3-VL of ``config``'s shapes, every tensor created in ``dtype`` on ``device`` (never an
    fp32 copy first: 8B parameters in fp32 would be 33 GB), in eval mode, generating until told to stop."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if wrong:  # a weight left in another dtype would read more bytes than production's
        raise RuntimeError(f"model built with {sorted(wrong)} weights, expected {dtype}")
    text = config.text_config
    model.generation_config = GenerationConfig(
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, do_sample=False
    )
    return model.eval()


def _lm_linears(model: Any) -> dict[str, nn.Linear]:
    pattern = re.compile(LM_TARGETS)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)}


def write_adapters(model: Any, out: Path, n: int, rank: int, seed: int = 1) -> list[Path]:
    """``n`` random LoRA adapters on the language model's linears, written as PEFT folders.

    A and B are both drawn as PEFT's ``init_lora_weights=False`` draws them (Kaiming-uniform, so B is
    not zero and every slot's matmuls carry real values), on the model's device and in its dtype.
    """
    from safetensors.torch import save_file

    linears = _lm_linears(model)
    w = next(iter(linears.values())).weight
    gen = torch.Generator(device=w.device)
    paths = []
    for i in range(n):
        gen.manual_seed(seed + i)
        tensors: dict[str, torch.Tensor] = {}
        for name, lin in linears.items():
            a = torch.empty(rank, lin.in_features, device=w.device, dtype=w.dtype)
            b = torch.empty(lin.out_features, rank, device=w.device, dtype=w.dtype)
            a.uniform_(-1 / math.sqrt(lin.in_features), 1 / math.sqrt(lin.in_features), generator=gen)
            b.uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank), generator=gen)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu()
        folder = out / f"lora-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": rank,
            "target_modules": LM_TARGETS,
            "task_type": None,
            "base_model_name_or_path": "random-qwen3-vl",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        paths.append(folder)
    return paths


@torch.no_grad()
def fold_adapter(model: Any, folder: Path, sign: float = 1.0) -> None:
    """Add (``sign`` 1) or take away (-1) an adapter's ``scaling * B @ A`` in the model's own weights: a
    merged model (same shapes and cost as the base), made in place (a copy of 8B weights would not fit)."""
    from moe_core.engine.lora import parse_adapter

    adapter = parse_adapter(folder.name, folder)
    for module, (a, b) in adapter.pairs.items():
        weight = model.get_submodule(module).weight
        delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * adapter.scaling
        weight.add_((sign * delta).to(weight.dtype))


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: the language model's layers, its final norm and the LM
    head; not the token embedding (a decode step reads one row of it per token), nor the vision tower,
    nor LoRA slots (:func:`lora_read_bytes`)."""
    from moe_core.engine.lora import SlottedLinear

    top = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = top.model.language_model
    skip = {id(p) for p in lm.embed_tokens.parameters()}
    skip |= {id(t) for m in top.modules() if isinstance(m, SlottedLinear) for t in (m.lora_A, m.lora_B)}
    params = [*lm.parameters(), *top.lm_head.parameters()]
    return sum(p.numel() * p.element_size() for p in params if id(p) not in skip)


def lora_read_bytes(engine: Any, adapters: int) -> int:
    """Bytes of LoRA slot weights a decode step reads with ``adapters`` distinct adapters in the batch:
    each non-vision slotted layer's gathered A and B (maximum rank) per adapter, the LM head's included."""
    slots = engine.slots
    if slots is None or adapters == 0:
        return 0
    per_adapter = 0
    for layer in slots.layers.values():
        if layer.vision:
            continue
        a, b = layer.lora_A, layer.lora_B  # [slots + 1, in, r], [slots + 1, r, out]
        per_adapter += (a[0].numel() + b[0].numel()) * a.element_size()
    return per_adapter * adapters
