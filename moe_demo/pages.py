"""Synthetic document pages for the tiny document-OCR model (``chandra`` in the embedded default).

A page is a square on a grid of :data:`PAGE_GRID` x :data:`PAGE_GRID` cells, one image token each at the
chandra model's pixel bounds (320 x 320 model pixels, 32 x 32 per token): a title, two or three one-line
text blocks and, on half the pages, a small table of two rows of two cells. Every block fills the text
column (cells 1 to 8) on its own rows, one empty row between blocks, in reading order; each character is
set centred in its own cell, as the ``ocr`` expert's screens are (:mod:`moe_demo.screens` says why: the
tiny model's vision tower is random and frozen, and reads a glyph on the token grid far better than one
that straddles two tokens). A page's answer is chandra's layout HTML (``chandra.prompts`` ``ocr_layout``):
one ``<div data-bbox="x0 y0 x1 y1" data-label="...">`` per block, the box in chandra's 0-1000 scale.

What varies: the number of blocks, the table, the text (the ``ocr`` expert's alphabet of digits and
capitals without I and O, so each character is one token of the tiny tokenizer), the page's size (the
cell is 48 to 72 pixels, the page 480 to 720), the glyph size and the ink and paper shades. The page is
drawn larger than the model sees it, as a scan would be: chandra's client scales it to its 28-pixel grid
and the server to the model's bounds, which keeps the glyphs on the token grid (both are uniform scales).

What does not: each text's length, fixed per block type (:data:`TEXT_LENGTHS`), so that every block's text
starts at the same place of the answer on every page. The model finds a character's column by relative
position: Qwen3-VL's M-RoPE gives the image token in column ``c`` the width position ``s + c`` and the
answer's ``j``-th token ``P0 + j``, so along a line the offset between the step and the character it reads
is constant, but that constant is where the block's text starts in the answer. With lengths that vary,
it depends on every earlier text's length, which the two-layer model cannot learn to count (in trials,
a fixed-length title read three times the columns of the variable-length texts after it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from moe_demo.screens import OCR_ALPHABETS, _glyph

__all__ = [
    "BBOX_SCALE",
    "PAGE_GRID",
    "PAGE_PIXELS",
    "TEXT_LENGTHS",
    "Block",
    "Page",
    "make_page",
    "page_split",
]

#: Cells per side of a page: one image token each at the model's bounds.
PAGE_GRID = 10
#: The chandra model's pixel bounds (min, max): every square page is seen at 320 x 320 model pixels. A
#: little slack around 320 * 320 so that qwen-vl-utils' rounding never lands on 9 x 9 tokens.
PAGE_PIXELS = (300 * 300, 340 * 340)
#: chandra's bbox scale (``chandra.settings.BBOX_SCALE``).
BBOX_SCALE = 1000
#: The text column, in cells: blocks span it; text starts at its first cell.
COLUMN = (1, 9)
#: Each text's length by its block's label (a table's: each cell's); the output grammar
#: (``outputs.chandra`` of the shipped config) holds the same lengths.
TEXT_LENGTHS = {"Section-Header": 6, "Text": 8, "Table": 3}
#: Disjoint seed ranges: training, validation, held-out (as :mod:`moe_demo.screens`).
_SPLITS = {"train": 0, "heldout": 1_000_000, "validation": 2_000_000}
_ALPHABET = OCR_ALPHABETS[1]


@dataclass(frozen=True)
class Block:
    label: str  # chandra's data-label: Section-Header, Text or Table
    row: int  # first row, in cells
    rows: int  # rows it spans
    cells: tuple[tuple[str, ...], ...]  # its text: one line (title, text) or the table's rows of cells

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """The block's box on chandra's 0-1000 scale: the text column over its rows."""
        s = BBOX_SCALE // PAGE_GRID
        return (COLUMN[0] * s, self.row * s, COLUMN[1] * s, (self.row + self.rows) * s)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(t for line in self.cells for t in line)

    def html(self) -> str:
        x0, y0, x1, y1 = self.bbox
        if self.label == "Section-Header":
            inner = f"<h1>{self.cells[0][0]}</h1>"
        elif self.label == "Text":
            inner = f"<p>{self.cells[0][0]}</p>"
        else:
            inner = "<table>" + "".join(
                "<tr>" + "".join(f"<td>{c}</td>" for c in line) + "</tr>" for line in self.cells
            )
            inner += "</table>"
        return f'<div data-bbox="{x0} {y0} {x1} {y1}" data-label="{self.label}">{inner}</div>'


@dataclass(frozen=True)
class Page:
    seed: int
    image: Image.Image
    blocks: tuple[Block, ...]
    glyphs: tuple[tuple[float, float], ...]  # centre of each character, in answer order, as fractions

    @property
    def answer(self) -> str:
        """chandra's layout HTML for this page."""
        return "".join(b.html() for b in self.blocks)

    @property
    def text(self) -> str:
        """Every text of the page, in reading order, one per line."""
        return "\n".join(t for b in self.blocks for t in b.texts)


def page_split(name: str, n: int, offset: int = 0) -> list[Page]:
    base = _SPLITS[name] + offset
    return [make_page(base + i) for i in range(n)]


def make_page(seed: int) -> Page:
    """One page, deterministic from ``seed``."""
    rng = random.Random(f"page-{seed}")
    blocks = [Block("Section-Header", 0, 1, ((_word(rng, "Section-Header"),),))]
    for _ in range(rng.randint(2, 3)):
        blocks.append(Block("Text", blocks[-1].row + blocks[-1].rows + 1, 1, ((_word(rng, "Text"),),)))
    if rng.random() < 0.5:
        cells = tuple((_word(rng, "Table"), _word(rng, "Table")) for _ in range(2))
        blocks.append(Block("Table", blocks[-1].row + blocks[-1].rows + 1, 2, cells))
    u = rng.randint(48, 72)
    side = PAGE_GRID * u
    paper = rng.randint(240, 255)
    img = Image.new("RGB", (side, side), (paper, paper, paper))
    ink = rng.randint(0, 50)
    size = int(u * rng.uniform(0.75, 0.85))
    glyphs: list[tuple[float, float]] = []
    for b in blocks:
        for r, line in enumerate(b.cells):
            for k, text in enumerate(line):
                col = COLUMN[0] + 4 * k  # a table's second cell starts half way along the column
                for i, ch in enumerate(text):
                    cx, cy = (col + i + 0.5) * u, (b.row + r + 0.5) * u
                    mask = _glyph(ch, size, 1 if b.label == "Section-Header" else 0)
                    img.paste(
                        Image.new("RGB", mask.size, (ink, ink, ink)),
                        (int(cx - mask.width / 2), int(cy - mask.height / 2)),
                        mask,
                    )
                    glyphs.append((cx / side, cy / side))
        if b.label == "Table":  # the table's rules: above, between and below its rows
            for r in range(b.rows + 1):
                y = (b.row + r) * u
                ImageDraw.Draw(img).line([(COLUMN[0] * u, y), (COLUMN[1] * u, y)], fill=(160, 160, 160))
    return Page(seed, img, tuple(blocks), tuple(glyphs))


def _word(rng: random.Random, label: str) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(TEXT_LENGTHS[label]))
