"""The one image preprocessing step: Qwen's aspect-preserving resize, through ``qwen-vl-utils``.

Serving, demo training, merge verification and the benchmarks all prepare screenshots here, as Qwen's
own fine-tuning recipes do: the aspect ratio is kept and both sides land on the patch grid (patch x
spatial merge, 32 px for Qwen3-VL) with the pixel count inside ``[min_pixels, max_pixels]``. The model
then sees ``(width / 32) * (height / 32)`` image tokens, known from the image size alone, before any
batch: :func:`plan` computes it without touching pixels (Qwen's ``smart_resize`` arithmetic, here in plain
Python, so the gateway plans images without importing torch), :func:`prepare` does the resize.
qwen-vl-utils (which imports torchvision) is imported only when an image is resized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["MAX_RATIO", "ImagePlan", "PixelBounds", "plan", "prepare", "smart_resize"]

#: The most elongated image qwen-vl-utils resizes (long side over short side).
MAX_RATIO = 200


@dataclass(frozen=True)
class PixelBounds:
    """How many pixels the model may see of one image (Qwen's ``min_pixels``/``max_pixels``)."""

    min_pixels: int
    max_pixels: int

    def narrowed(self, min_pixels: int | None, max_pixels: int | None) -> PixelBounds:
        """A request's own bounds (Qwen's per-image override), which must lie within these.

        Raises ``ValueError`` whose first word is the offending field.
        """
        lo = self.min_pixels if min_pixels is None else min_pixels
        hi = self.max_pixels if max_pixels is None else max_pixels
        for field, v in (("min_pixels", lo), ("max_pixels", hi)):
            if not self.min_pixels <= v <= self.max_pixels:
                raise ValueError(
                    f"{field} {v} is outside the configured [{self.min_pixels}, {self.max_pixels}]"
                )
        if lo > hi:
            raise ValueError(f"min_pixels {lo} is larger than max_pixels {hi}")
        return PixelBounds(lo, hi)


@dataclass(frozen=True)
class ImagePlan:
    """What the model sees of one image: its size on the patch grid and its number of image tokens."""

    width: int  # the screenshot as sent
    height: int
    model_width: int  # as resized for the model; click coordinates refer to this size
    model_height: int
    tokens: int  # image tokens in the prompt (after the spatial merge)


def plan(width: int, height: int, bounds: PixelBounds, factor: int) -> ImagePlan:
    """The resized size and token count of a ``width`` x ``height`` image; ``factor`` = patch x merge.

    Raises ``ValueError`` for images qwen-vl-utils refuses (an aspect ratio over 200:1).
    """
    h, w = smart_resize(height, width, factor, bounds.min_pixels, bounds.max_pixels)
    return ImagePlan(width, height, w, h, (w // factor) * (h // factor))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize``: the ``(height, width)`` nearest the image's on the ``factor`` grid
    with the pixel count in ``[min_pixels, max_pixels]`` (equal to it on every size; tested)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def prepare(image: Image.Image, bounds: PixelBounds, patch_size: int) -> Image.Image:
    """RGB, resized by qwen-vl-utils within ``bounds`` on the grid of ``patch_size`` x its spatial merge."""
    from qwen_vl_utils import fetch_image

    item = {"image": image, "min_pixels": bounds.min_pixels, "max_pixels": bounds.max_pixels}
    resized: Image.Image = fetch_image(item, image_patch_size=patch_size)  # type: ignore[arg-type]
    return resized
