"""Synthetic screenshots of six screen types, each with one target element.

Each type is recognisable by its layout (a month grid, a form, a login box, bars, a slot list, icons
on a wallpaper); sizes, colours, offsets and noise are random so that no single pixel gives it away.
The target element (drawn in an accent colour shared by all types) sits in one cell of a coarse
``GRID`` x ``GRID`` grid over the image; the expert's answer is ``click(col, row)`` of that cell.
Everything is deterministic from a seed; the train, validation and held-out splits use disjoint
seed ranges.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = [
    "GRID",
    "PROMPTS",
    "SCREEN_TYPES",
    "Screen",
    "action",
    "make_screen",
    "split",
]

#: The action grammar: click(col, row) on a GRID x GRID grid over the screenshot, 0-based.
GRID = 4

#: The instruction each expert is asked with.
PROMPTS: dict[str, str] = {
    "calendar": "Click the highlighted day",
    "claim-window": "Click the Submit button",
    "login-window": "Click the Login button",
    "chart-screen": "Click the highlighted bar",
    "appointment": "Click the free slot",
    "desktop": "Click the Open icon",
}

SCREEN_TYPES: tuple[str, ...] = tuple(PROMPTS)

#: Disjoint seed ranges: training, validation (picks among training attempts), held-out (reported).
_SPLITS = {"train": 0, "heldout": 1_000_000, "validation": 2_000_000}

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Screen:
    kind: str
    seed: int
    image: Image.Image
    cell: tuple[int, int]  # (col, row) of the target on the GRID

    @property
    def prompt(self) -> str:
        return PROMPTS[self.kind]

    @property
    def answer(self) -> str:
        return action(*self.cell)


def action(col: int, row: int) -> str:
    return f"click({col}, {row})"


def split(name: str, n: int, kinds: tuple[str, ...] = SCREEN_TYPES, offset: int = 0) -> list[Screen]:
    """``n`` screens per kind from the 'train', 'validation' or 'heldout' seed range."""
    if name not in _SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {list(_SPLITS)}")
    base = _SPLITS[name]
    return [make_screen(k, base + offset + i) for i in range(n) for k in kinds]


def make_screen(kind: str, seed: int, clutter: bool = True) -> Screen:
    """One screen; ``clutter=False`` draws only the background and the target (a training warm-up)."""
    if kind not in _DRAW:
        raise ValueError(f"unknown screen type {kind!r}; expected one of {list(_DRAW)}")
    rng = random.Random(f"{kind}:{seed}")
    # square, so that Qwen's aspect-preserving resize within the demo's bounds (min_pixels = max_pixels =
    # 128^2) gives every screen the tiny model's 128 x 128 input: 4 x 4 image tokens, one per grid cell
    w = h = rng.randint(240, 420)
    img = Image.new("RGB", (w, h), _light(rng))
    draw = ImageDraw.Draw(img)
    cell = (rng.randrange(GRID), rng.randrange(GRID))
    if clutter:
        _DRAW[kind](draw, rng, w, h, cell)
    else:
        draw.rectangle(_cell_box(rng, w, h, cell), fill=_accent(rng))
    _noise(img, rng)
    return Screen(kind, seed, img, cell)


# ----------------------------------------------------------------- colours
def _light(rng: random.Random) -> Colour:
    return (rng.randint(190, 250), rng.randint(190, 250), rng.randint(190, 250))


def _mid(rng: random.Random) -> Colour:
    return (rng.randint(90, 170), rng.randint(90, 170), rng.randint(90, 170))


def _dark(rng: random.Random) -> Colour:
    return (rng.randint(20, 80), rng.randint(20, 80), rng.randint(20, 80))


def _accent(rng: random.Random) -> Colour:
    """The target's colour: a saturated orange-red, the same family on every screen type."""
    return (rng.randint(225, 255), rng.randint(60, 110), rng.randint(0, 40))


def _cell_box(rng: random.Random, w: int, h: int, cell: tuple[int, int]) -> list[int]:
    """The target's box: 70-85% of grid cell ``cell``, its centre near the cell's centre.

    Large on purpose: the demo feeds the tiny model 128 px images, 4x4 image tokens, one per grid
    cell; a target that fills its cell is what a LoRA expert can learn to locate within the build's
    time budget.
    """
    cw, ch = w / GRID, h / GRID
    bw, bh = int(cw * rng.uniform(0.7, 0.85)), int(ch * rng.uniform(0.7, 0.85))
    cx = (cell[0] + 0.5 + rng.uniform(-0.07, 0.07)) * cw
    cy = (cell[1] + 0.5 + rng.uniform(-0.07, 0.07)) * ch
    return [int(cx - bw / 2), int(cy - bh / 2), int(cx + bw / 2), int(cy + bh / 2)]


def _noise(img: Image.Image, rng: random.Random) -> None:
    px = img.load()
    assert px is not None
    w, h = img.size
    for _ in range(w * h // 40):
        x, y = rng.randrange(w), rng.randrange(h)
        r, g, b = px[x, y]  # type: ignore[misc]
        d = rng.randint(-25, 25)
        px[x, y] = (max(0, min(255, r + d)), max(0, min(255, g + d)), max(0, min(255, b + d)))


# ------------------------------------------------------------------ layouts
def _calendar(d: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, cell: tuple[int, int]) -> None:
    d.rectangle([0, 0, w, int(h * 0.12)], fill=_mid(rng))  # month header
    cols, rows = 7, rng.choice([5, 6])
    top = int(h * 0.15)
    cw, ch = w / cols, (h - top) / rows
    line = _mid(rng)
    for r in range(rows):
        for c in range(cols):
            box = [int(c * cw) + 2, int(top + r * ch) + 2, int((c + 1) * cw) - 2, int(top + (r + 1) * ch) - 2]
            d.rectangle(box, outline=line, width=1, fill=_light(rng) if rng.random() < 0.3 else None)
    d.rectangle(_cell_box(rng, w, h, cell), fill=_accent(rng))


def _form(d: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, cell: tuple[int, int]) -> None:
    d.rectangle([0, 0, w, int(h * 0.08)], fill=_dark(rng))  # title bar
    for i in range(rng.randint(3, 5)):
        y = int(h * (0.15 + 0.15 * i))
        d.rectangle([int(w * 0.05), y, int(w * 0.25), y + 10], fill=_mid(rng))  # label
        d.rectangle([int(w * 0.3), y - 4, int(w * 0.92), y + 14], fill=(255, 255, 255), outline=_mid(rng))
    for _ in range(2):  # distractor buttons
        x, y = rng.randint(0, w - 70), rng.randint(int(h * 0.8), h - 25)
        d.rectangle([x, y, x + 60, y + 22], fill=_mid(rng))
    d.rectangle(_cell_box(rng, w, h, cell), fill=_accent(rng))


def _login(d: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, cell: tuple[int, int]) -> None:
    bw, bh = int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.45, 0.65))
    x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
    d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=(255, 255, 255), outline=_dark(rng), width=3)
    d.ellipse([x0 + bw // 2 - 14, y0 + 8, x0 + bw // 2 + 14, y0 + 36], fill=_mid(rng))  # avatar
    for i in range(2):
        y = y0 + int(bh * (0.4 + 0.2 * i))
        d.rectangle([x0 + 12, y, x0 + bw - 12, y + 16], outline=_mid(rng), width=2)
    d.rectangle(_cell_box(rng, w, h, cell), fill=_accent(rng))


def _chart(d: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, cell: tuple[int, int]) -> None:
    axis = _dark(rng)
    d.line([int(w * 0.08), int(h * 0.05), int(w * 0.08), int(h * 0.95)], fill=axis, width=3)
    d.line([int(w * 0.05), int(h * 0.92), int(w * 0.97), int(h * 0.92)], fill=axis, width=3)
    n = rng.randint(6, 10)
    bar_w = w * 0.85 / n
    for i in range(n):
        top = int(h * rng.uniform(0.15, 0.8))
        x = int(w * 0.1 + i * bar_w)
        d.rectangle([x + 3, top, int(x + bar_w) - 3, int(h * 0.92)], fill=_mid(rng))
    d.rectangle(_cell_box(rng, w, h, cell), fill=_accent(rng))


def _appointment(d: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, cell: tuple[int, int]) -> None:
    d.rectangle([0, 0, int(w * 0.18), h], fill=_mid(rng))  # hours column
    n = rng.randint(6, 9)
    sh = h / n
    for i in range(n):
        y = int(i * sh)
        d.line([0, y, w, y], fill=_dark(rng), width=2)
        if rng.random() < 0.5:
            d.rectangle(
                [int(w * 0.22), y + 4, int(w * rng.uniform(0.5, 0.95)), int(y + sh) - 4], fill=_mid(rng)
            )
    d.rectangle(_cell_box(rng, w, h, cell), fill=_accent(rng))


def _desktop(d: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, cell: tuple[int, int]) -> None:
    a, b = _mid(rng), _dark(rng)
    for y in range(0, h, 4):  # wallpaper gradient
        t = y / h
        d.rectangle([0, y, w, y + 4], fill=tuple(int(a[i] * (1 - t) + b[i] * t) for i in range(3)))
    d.rectangle([0, h - 18, w, h], fill=_dark(rng))  # task bar
    for _ in range(rng.randint(4, 8)):
        x, y = rng.randint(0, w - 32), rng.randint(0, h - 50)
        d.rounded_rectangle([x, y, x + 28, y + 28], radius=5, fill=_light(rng))
    d.rounded_rectangle(_cell_box(rng, w, h, cell), radius=5, fill=_accent(rng))


_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, random.Random, int, int, tuple[int, int]], None]] = {
    "calendar": _calendar,
    "claim-window": _form,
    "login-window": _login,
    "chart-screen": _chart,
    "appointment": _appointment,
    "desktop": _desktop,
}
