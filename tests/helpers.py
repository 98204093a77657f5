"""Helpers shared by tests: real PEFT adapters on the tiny model, and a test screenshot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from moe_core.config import BUILTIN_TINY, BaseModelConfig
from moe_core.modeling import LM_TARGETS, VISION_TARGETS


def make_lora(out: Path, seed: int, lm_head: bool = False, rank: int = 4, vision: bool = False) -> Path:
    """Save a PEFT LoRA with random, non-zero A and B (so it changes the outputs) on the tiny model;
    ``vision`` adapts the vision tower's linears too."""
    from peft import LoraConfig, get_peft_model

    from moe_core.modeling import load_model

    torch.manual_seed(seed)
    model = load_model(BaseModelConfig())
    targets = LM_TARGETS + ("|lm_head" if lm_head else "") + ("|" + VISION_TARGETS if vision else "")
    peft = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    )
    with torch.no_grad():  # make the effect large enough to change greedy tokens
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft.peft_config["default"].base_model_name_or_path = BUILTIN_TINY
    peft.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == BUILTIN_TINY
    return out


def screenshot(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A small deterministic picture with a few coloured boxes."""
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", size, tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in torch.randint(0, min(size) - 40, (2,), generator=g))
        colour = tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g))
        draw.rectangle([x, y, x + 40, y + 30], fill=colour)
    return img


#: Merge probes for tests: screenshots of several sizes with their prompts.
PROBES = [(screenshot(i, (160 + 16 * i, 128)), f"Click the button {i}") for i in range(6)]


#: Formats refused by the default ``limits.image_formats``, and those accepted.
REFUSED_FORMATS = ("DDS", "TGA", "ICO", "TIFF", "EPS", "PDF", "SVG", "DDS-NO-PIXEL-FORMAT")
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def image_file(fmt: str, image: Image.Image | None = None) -> bytes:
    """``image`` (a 64x64 red square by default) as a file of ``fmt``. ``SVG`` is a drawing Pillow cannot
    read; ``DDS-NO-PIXEL-FORMAT`` is a DDS header whose pixel format has no flags (Pillow's DDS plugin raises
    ``NotImplementedError`` on it, which was once a 500)."""
    import io
    import struct

    if fmt == "SVG":
        return b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
    if fmt == "DDS-NO-PIXEL-FORMAT":
        header = struct.pack(
            "<4sIIIIIII44sII4sIIIIIIIIII",
            *(
                b"DDS ",
                124,
                0x1007,
                4,
                4,
                0,
                0,
                0,
                b"\0" * 44,
                32,
                0,
                b"\0" * 4,
                0,
                0,
                0,
                0,
                0,
                0x1000,
                0,
                0,
                0,
                0,
            ),
        )
        return header + b"\0" * 64
    buf = io.BytesIO()
    (image or Image.new("RGB", (64, 64), (200, 30, 30))).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def without_models(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping without its further models (chandra) and their grammars: the apps that test
    something else start no replica for them."""
    names = {m["name"] for m in data.get("models", [])}
    data["models"] = []
    data["outputs"] = {k: v for k, v in data.get("outputs", {}).items() if k not in names}
    return data
