"""The one image preprocessing step: Qwen's aspect-preserving resize, through ``qwen-vl-utils``.

Serving, demo training, merge verification and the benchmarks all prepare screenshots here, as Qwen's
own fine-tuning recipes do: the aspect ratio is kept and both sides land on the patch grid (patch x
spatial merge, 32 px for Qwen3-VL) with the pixel count inside ``[min_pixels, max_pixels]``. The model
then sees ``(width / 32) * (height / 32)`` image tokens, known from the image size alone, before any
batch: :func:`plan` computes it without touching pixels, :func:`prepare` does the resize.
qwen-vl-utils (which imports torchvision) is imported only when an image is handled, so the config
module can import this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImagePlan", "PixelBounds", "plan", "prepare"]


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
    from qwen_vl_utils import smart_resize  # imports torchvision: only where images are handled

    h, w = smart_resize(height, width, factor, bounds.min_pixels, bounds.max_pixels)
    return ImagePlan(width, height, w, h, (w // factor) * (h // factor))


def prepare(image: Image.Image, bounds: PixelBounds, patch_size: int) -> Image.Image:
    """RGB, resized by qwen-vl-utils within ``bounds`` on the grid of ``patch_size`` x its spatial merge."""
    from qwen_vl_utils import fetch_image

    item = {"image": image, "min_pixels": bounds.min_pixels, "max_pixels": bounds.max_pixels}
    resized: Image.Image = fetch_image(item, image_patch_size=patch_size)  # type: ignore[arg-type]
    return resized
