"""Synthetic screenshots of seven screen types, each with one target element.

Six types are clicked: each is recognisable by its layout (a month grid, a form, a login box, bars, a
slot list, icons on a wallpaper); sizes, colours, offsets and noise are random so that no single pixel
gives it away. The target element (drawn in an accent colour shared by all types) sits in one cell of
a coarse ``GRID`` x ``GRID`` grid over the image; the expert's answer is ``click(col, row)`` of that cell.
The seventh, ``ocr``, is read: a form of two text fields, one highlighted, and the expert's answer is
the highlighted field's text (:func:`make_screen` documents its layout).
Everything is deterministic from a seed; the train, validation and held-out splits use disjoint
seed ranges.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "GRID",
    "OCR_ALPHABETS",
    "OCR_LAYOUT",
    "PROMPTS",
    "READING_TYPES",
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
    "ocr": "Read the highlighted field",
}

SCREEN_TYPES: tuple[str, ...] = tuple(PROMPTS)

#: Screen types whose answer is text read off the screen, not an action (scored by exact match and
#: character accuracy).
READING_TYPES: frozenset[str] = frozenset({"ocr"})

#: The ocr screen in image tokens, (columns, rows): a 4:1 screen that the demo's pixel bounds
#: (128 x 128 pixels) show the model at 256 x 64 pixels, 8 x 2 image tokens of 32 x 32 pixels.
OCR_LAYOUT = (8, 2)

#: The ocr strings' characters: digits, or digits and capitals. I and O are left out: they read as 1
#: and 0, and the tiny model's tokenizer has "OK" as one token (every other character is its own token).
OCR_ALPHABETS = ("0123456789", "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ")

#: Disjoint seed ranges: training, validation (picks among training attempts), held-out (reported).
_SPLITS = {"train": 0, "heldout": 1_000_000, "validation": 2_000_000}

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Screen:
    kind: str
    seed: int
    image: Image.Image
    cell: tuple[int, int]  # (col, row) of the target on the GRID
    text: str = ""  # a reading screen's answer: the highlighted field's text
    glyphs: tuple[tuple[float, float], ...] = ()  # centre of each character of text, as fractions of (w, h)

    @property
    def prompt(self) -> str:
        return PROMPTS[self.kind]

    @property
    def answer(self) -> str:
        return self.text if self.kind in READING_TYPES else action(*self.cell)


def action(col: int, row: int) -> str:
    return f"click({col}, {row})"


def split(name: str, n: int, kinds: tuple[str, ...] = SCREEN_TYPES, offset: int = 0) -> list[Screen]:
    """``n`` screens per kind from the 'train', 'validation' or 'heldout' seed range."""
    if name not in _SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {list(_SPLITS)}")
    base = _SPLITS[name]
    return [make_screen(k, base + offset + i) for i in range(n) for k in kinds]


def make_screen(kind: str, seed: int, clutter: bool = True) -> Screen:
    """One screen; ``clutter=False`` draws only the background and the target (a training warm-up; an
    ocr screen keeps its layout and leaves the field that is not read empty)."""
    if kind not in PROMPTS:
        raise ValueError(f"unknown screen type {kind!r}; expected one of {list(PROMPTS)}")
    rng = random.Random(f"{kind}:{seed}")
    if kind == "ocr":
        return _ocr(rng, seed, clutter)
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


# ---------------------------------------------------------------- reading
def _ocr(rng: random.Random, seed: int, clutter: bool) -> Screen:
    """Two rows, each a label bar and a text field; one field is highlighted; the answer is its text.

    Drawn on a grid of :data:`OCR_LAYOUT` cells of ``u`` x ``u`` pixels (``u`` from 32 to 64, so the
    screen is 256 x 64 to 512 x 128, always 4:1), one cell per image token at the demo's pixel bounds:
    the labels fill the first column, each field the other seven, and its text (2 to 6 characters,
    digits or digits and capitals) is set one character per cell from the second column, centred, at a
    font size of 70-90% of a cell, in one of three faces (Pillow's built-in Aileron: regular, bold,
    oblique). Glyphs sit on the token grid on purpose: the tiny model's vision tower is random and
    frozen, and is not shift invariant; a glyph that straddles two tokens, or moves a pixel or two
    within one, is much harder to tell apart (a linear probe on one token's features: 99% for glyphs on
    the grid, 80% when they move +-1.6 model pixels). Which field is highlighted, the screen's size,
    the glyph size, the font and the colours vary. ``clutter=False`` leaves the other field empty.
    """
    cols, rows = OCR_LAYOUT
    u = rng.randint(32, 64)
    w, h = cols * u, rows * u
    img = Image.new("RGB", (w, h), _light(rng))
    draw = ImageDraw.Draw(img)
    font = rng.randrange(3)
    size = int(u * rng.uniform(0.7, 0.9))
    ink = _dark(rng)
    target = rng.randrange(rows)
    text = ""
    glyphs: tuple[tuple[float, float], ...] = ()
    for row in range(rows):
        y = row * u
        draw.rectangle([int(u * 0.1), y + int(u * 0.35), int(u * 0.85), y + int(u * 0.65)], fill=_mid(rng))
        alphabet = OCR_ALPHABETS[rng.randrange(2)]
        chars = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6)))
        box = [u - 3, y + 2, w - 3, y + u - 3]
        if row == target:
            pale = (255, rng.randint(225, 245), rng.randint(200, 230))
            draw.rectangle(box, fill=pale, outline=_accent(rng), width=max(2, u // 12))
            text = chars
            glyphs = tuple(((1.5 + i) / cols, (row + 0.5) / rows) for i in range(len(chars)))
        else:
            draw.rectangle(box, fill=(255, 255, 255), outline=_mid(rng), width=1)
            if not clutter:
                continue
        for i, ch in enumerate(chars):
            mask = _glyph(ch, size, font)
            x, yy = int((1.5 + i) * u - mask.width / 2), int(y + u / 2 - mask.height / 2)
            img.paste(Image.new("RGB", mask.size, ink), (x, yy), mask)
    _noise(img, rng)
    centre = (
        min(GRID - 1, int(GRID * (1 + len(text) / 2) / cols)),
        min(GRID - 1, int(GRID * (target + 0.5) / rows)),
    )
    return Screen("ocr", seed, img, centre, text, glyphs)


@functools.lru_cache(maxsize=4096)
def _glyph(ch: str, size: int, font: int) -> Image.Image:
    """``ch`` as a mask (mode L) cropped to its ink, in Pillow's built-in Aileron at ``size``: regular
    (0), bold (1) or oblique (2)."""
    face = ImageFont.load_default(size=size)
    stroke = 1 if font == 1 else 0
    x0, y0, x1, y1 = face.getbbox(ch, stroke_width=stroke)
    mask = Image.new("L", (int(x1 - x0) + 2, int(y1 - y0) + 2), 0)
    ImageDraw.Draw(mask).text((1 - x0, 1 - y0), ch, font=face, fill=255, stroke_width=stroke, stroke_fill=255)
    if font == 2:  # slanted right by a fifth of its height
        w, h = mask.size
        slant = 0.2
        mask = mask.transform(
            (w + int(slant * h), h),
            Image.Transform.AFFINE,
            (1, slant, -slant * (h - 1), 0, 1, 0),
            resample=Image.Resampling.BILINEAR,
        )
    return mask


_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, random.Random, int, int, tuple[int, int]], None]] = {
    "calendar": _calendar,
    "claim-window": _form,
    "login-window": _login,
    "chart-screen": _chart,
    "appointment": _appointment,
    "desktop": _desktop,
}
