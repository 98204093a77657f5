"""Train the tiny document-OCR model (``chandra`` in the embedded default) and save it as a full checkpoint.

A fine-tune of the tiny base on synthetic pages (:mod:`moe_demo.pages`) to answer chandra's ``ocr_layout``
prompt with chandra's layout HTML: a LoRA is trained, merged into the base in fp32 and saved whole
(safetensors), so it is served as its own model, like any full checkpoint.

What makes it affordable on two CPU cores: chandra's prompt is 1,668 tokens of the tiny tokenizer, after
a page's 100 image tokens, so a whole example is about 2,100 tokens and only its last ~300 (the answer)
carry the loss. The LoRA adapts every linear of the last layer, and the LM head; the first layer is the
base's, so its output (the last layer's input) is computed once per page (:class:`PrefixBank`). A training
step computes the last layer's keys and values from it, and its queries only at a sample of the answer's
positions (every character, every choice the output grammar leaves open, every block's height, a few
more): :func:`forward_rows`. Reading is learnt as the ``ocr`` expert learns it (:mod:`moe_demo.train`):
the LM head's LoRA at ``head_lr`` times the rate, and attention supervision that points two heads of the
last layer, at the step that predicts a character, at the image token holding it. One more thing reads a
page: the last layer's query and key norms are trained too (at ``norm_lr`` times the rate; saved with the
merged model, as they are weights of the base). Those RMS norms cap every attention logit at about
``head_dim ** 0.5`` with the base's unit weights: with the norms fixed no query can single out a column
(in trials, 20% of the supervised heads' attention on the character's column, against 90% with them
trained). And the fine-tune has a RoPE base of its own (:func:`set_rope_theta`), in its config: at the
base's, M-RoPE's finest width frequency turns only 0.077 radians a column.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from moe_core.engine import Engine, GenerationRequest
from moe_demo.pages import Page

__all__ = [
    "OCR_LAYOUT_PROMPT",
    "OcrSpec",
    "PrefixBank",
    "client_view",
    "evaluate_pages",
    "save_merged",
    "set_rope_theta",
    "teacher_forced",
    "train_ocr",
]

logger = logging.getLogger(__name__)

END = "<|im_end|>"

#: chandra's ``ocr_layout`` prompt (chandra-ocr 0.2.0, ``chandra.prompts.PROMPT_MAPPING["ocr_layout"]``),
#: copied so the demo build does not need chandra-ocr installed; a test checks it is still chandra's.
_TAGS = (
    "['math', 'br', 'i', 'b', 'u', 'del', 'sup', 'sub', 'table', 'tr', 'td', 'p', 'th', 'div', 'pre', 'h1', "
    "'h2', 'h3', 'h4', 'h5', 'ul', 'ol', 'li', 'input', 'a', 'span', 'img', 'hr', 'tbody', 'small', 'caption', "
    "'strong', 'thead', 'big', 'code', 'chem']"
)
_ATTRS = (
    "['class', 'colspan', 'rowspan', 'display', 'checked', 'type', 'border', 'value', 'style', 'href', 'alt', "
    "'align', 'data-bbox', 'data-label']"
)
OCR_LAYOUT_PROMPT = f"""OCR this image to HTML, arranged as layout blocks.  Each layout block should be a div with the data-bbox attribute representing the bounding box of the block in x0 y0 x1 y1 format.  Bboxes are normalized 0-1000. The data-label attribute is the label for the block.

Use the following labels:
- Caption
- Footnote
- Equation-Block
- List-Group
- Page-Header
- Page-Footer
- Image
- Section-Header
- Table
- Text
- Complex-Block
- Code-Block
- Form
- Table-Of-Contents
- Figure
- Chemical-Block
- Diagram
- Bibliography
- Blank-Page

Only use these tags {_TAGS}, and these attributes {_ATTRS}.

Guidelines:
* Inline math: Surround math with <math>...</math> tags. Math expressions should be rendered in KaTeX-compatible LaTeX. Use display for block math.
* Tables: Use colspan and rowspan attributes to match table structure.
* Formatting: Maintain consistent formatting with the image, including spacing, indentation, subscripts/superscripts, and special characters.
* Images: Include a description of any images in the alt attribute of an <img> tag. Do not fill out the src property. Describe in detail inside the div tag. Also convert charts to high fidelity data, and convert diagrams to mermaid.
* Forms: Mark checkboxes and radio buttons properly.
* Text: join lines together properly into paragraphs using <p>...</p> tags.  Use <br> tags for line breaks within paragraphs, but only when absolutely necessary to maintain meaning.
* Chemistry: Use <chem>...</chem> tags for chemical formulas with reactive SMILES.
* Lists: Preserve indents and proper list markers.
* Use the simplest possible HTML structure that accurately represents the content of the block.
* Make sure the text is accurate and easy for a human to read and interpret.  Reading order should be correct and natural."""

#: A block's box in its answer: the first digit of its y1 (the group) tells a text's one row from a table's two.
_Y1 = re.compile(r'data-bbox="\d+ \d+ \d+ (\d+)"')

#: The row of the block after a page's second text, where the layout grammar lets the page go on as a
#: text or a table (or end).
_CHOICE_ROW = 6

#: Heads of the last layer that the attention loss supervises: one per key-value head (GQA), so the
#: two read different projections of the image token.
ATTEND_HEADS = (0, 2)


@dataclass(frozen=True)
class OcrSpec:
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    head_lr: float = 10.0
    rank: int = 16
    attend: float = 1.0
    others: int = 8  # answer positions trained per page beside its characters'
    norm_lr: float = 10.0  # the last layer's query and key norms' rate, times lr (0: frozen)
    rope_theta: float = 100.0  # the fine-tune's RoPE base (:func:`set_rope_theta`; 0: the base model's)
    seed: int = 0


def set_rope_theta(model: Any, theta: float) -> None:
    """Give ``model``'s language model the RoPE base ``theta`` (its config, saved with it, and its rotary
    embedding); 0 keeps the base model's. Call it before :class:`PrefixBank` encodes pages.

    The tiny base copies Qwen3-VL-8B's 5,000,000, made for contexts of 256K tokens: with a head of 24
    dimensions M-RoPE's width section gets frequencies 0.077, 0.0016 and 0.00003 radians a position, so
    neighbouring columns of a page differ by 0.077 radians at most and no query singles one out. At 100 the
    width's are 0.46, 0.15 and 0.046 (the height's 0.68, 0.22 and 0.068): a column of the 10-cell page is a
    sharp peak. Fine-tunes change the base the other way to lengthen contexts (Code Llama's 10,000 to
    1,000,000); a model's config carries it, so serving needs nothing."""
    if not theta:
        return
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    text = model.config.text_config
    text.rope_parameters = {**text.rope_parameters, "rope_theta": float(theta)}
    lm = model.model.language_model
    lm.rotary_emb = Qwen3VLTextRotaryEmbedding(config=text).to(lm.embed_tokens.weight.device)


def client_view(image: Image.Image) -> Image.Image:
    """The page as chandra's client sends it: scaled to its 28-pixel grid (``scale_to_fit`` for pages
    within its pixel bounds, as every demo page is)."""
    w, h = (max(28, round(s / 28) * 28) for s in image.size)
    return image if (w, h) == image.size else image.resize((w, h), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class _Row:
    """One page encoded once by the frozen base (the two-layer tiny model): everything a training step
    needs to run the last layer (the first is frozen: its output is fixed)."""

    h1: torch.Tensor  # [L, hidden]: the last layer's input, as the frozen first layer computes it
    cos: torch.Tensor  # [L, hd]: every position's M-RoPE rotation
    sin: torch.Tensor  # [L, hd]
    start: int  # absolute position of the first predicting position (the prompt's last token)
    labels: torch.Tensor  # [n]: the answer's tokens and <|im_end|>
    looks: tuple[tuple[int, int], ...]  # (predicting index, image token position), one per character
    # predicting indices of the choices the layout grammar (``outputs.chandra`` of the shipped config)
    # leaves open between blocks: after the second text and after a third, whether another block follows
    # ("<") or the answer ends (<|im_end|>), and the height of the block on row 6 (the first digit of its
    # y1: a text's one row or a table's two)
    choices: tuple[int, ...] = ()
    # what training asks beside the characters: the choices, and every block's height. Not the rest of
    # the markup, whose text the grammar forces (a fifth less training time, and as many held-out pages
    # right). The grammar forces the text, not its tokens: at about 27 places of an answer a shorter token
    # also spells what follows ("d" of "da"); the model is not trained there (served, 19 of 20 pages
    # come back exact)
    decisions: tuple[int, ...] = ()


def _char_offsets(page: Page) -> list[int]:
    """Where each of ``page``'s characters is in its answer, in glyph order."""
    html = page.answer
    offsets: list[int] = []
    at = 0
    for b in page.blocks:
        for text in b.texts:
            at = html.index(f">{text}<", at) + 1
            offsets += range(at, at + len(text))
            at += len(text)
    return offsets


class _Captured(Exception):
    """Stops a page's forward pass once the last layer's input is captured."""


class PrefixBank:
    """Pages encoded once by the frozen base model, for :func:`forward_rows`."""

    def __init__(self, model: Any, engine: Engine, pages: Sequence[Page]) -> None:
        t0 = time.perf_counter()
        tok = engine.processor.tokenizer
        layers = model.model.language_model.layers
        if len(layers) != 2:
            raise ValueError(
                f"the document model's training expects the tiny two-layer model, got {len(layers)}"
            )
        captured: dict[str, Any] = {}

        def grab(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["in1"] = (args[0] if args else kwargs["hidden_states"]).detach()
            captured["rope"] = kwargs["position_embeddings"]
            raise _Captured  # the last layer's input is all a page needs: the last layer is not run

        hook = layers[1].register_forward_pre_hook(grab, with_kwargs=True)
        self.rows: list[_Row] = []
        try:
            for page in pages:
                self.rows.append(self._encode(model, engine, page, tok, captured))
        finally:
            hook.remove()
        logger.info("ocr: encoded %d pages in %.1fs", len(self.rows), time.perf_counter() - t0)

    @staticmethod
    def _encode(model: Any, engine: Engine, page: Page, tok: Any, captured: dict[str, Any]) -> _Row:
        answer = page.answer + END
        inputs = engine.encode(
            [client_view(page.image)], [OCR_LAYOUT_PROMPT], answers=[answer], padding_side="right"
        )
        ids = inputs["input_ids"][0]
        enc = tok(answer, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        if ids[-n:].tolist() != enc["input_ids"]:
            raise ValueError(f"page {page.seed}: the answer does not tokenize on its own")
        with torch.no_grad(), contextlib.suppress(_Captured):
            model.model(**inputs, use_cache=False)
        cos, sin = (t[0] for t in captured["rope"])  # [L, hd]
        h1 = captured["in1"][0]
        image_id = int(tok.convert_tokens_to_ids("<|image_pad|>"))
        image = (ids == image_id).nonzero()[:, 0]
        start = len(ids) - n - 1
        grid = inputs["image_grid_thw"][0]
        rows_, cols = int(grid[1]) // 2, int(grid[2]) // 2
        first = int(image[0])
        token_of = {s: j for j, (s, e) in enumerate(enc["offset_mapping"]) if e == s + 1}
        looks = []
        for off, (gx, gy) in zip(_char_offsets(page), page.glyphs, strict=True):
            j = token_of.get(off)
            if j is None:
                raise ValueError(f"page {page.seed}: character {off} of the answer is not one token")
            looks.append((j, first + min(rows_ - 1, int(gy * rows_)) * cols + min(cols - 1, int(gx * cols))))
        heights = {token_of[m.start(1)] for m in _Y1.finditer(page.answer) if m.start(1) in token_of}
        choices, at = [], 0
        for b, m in zip(page.blocks, _Y1.finditer(page.answer), strict=True):
            at += len(b.html())
            if b.row == _CHOICE_ROW:  # a text's one row or a table's two
                choices.append(token_of[m.start(1)])
            if b.row == _CHOICE_ROW - 2 or (b.row == _CHOICE_ROW and b.label == "Text"):
                # another block ("<", a token of its own) or the end (<|im_end|>, the last token)
                choices.append(token_of[at] if at < len(page.answer) else n - 1)
        return _Row(
            h1=h1.clone(),
            cos=cos.clone(),
            sin=sin.clone(),
            start=start,
            labels=ids[start + 1 :].clone(),
            looks=tuple(looks),
            decisions=tuple(sorted(heights | set(choices))),
            choices=tuple(choices),
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _keys_values(
    layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys (rotated) and values ``[kv, L, hd]`` for its input ``h`` ``[L, hidden]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k = attn.k_norm(attn.k_proj(x).view(len(h), -1, attn.head_dim)).transpose(0, 1)
    k = k * cos[None] + _rotate_half(k) * sin[None]
    return k, attn.v_proj(x).view(len(h), -1, attn.head_dim).transpose(0, 1)


def _attend(
    layer: Any,
    h: torch.Tensor,
    at: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    row: _Row,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer at positions ``at`` (input ``h`` ``[q, hidden]``) over ``keys``/``values``: its output and its
    attention ``[heads, q, L]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = attn.q_norm(attn.q_proj(x).view(len(at), -1, attn.head_dim)).transpose(0, 1)  # [H, q, hd]
    q = q * row.cos[at][None] + _rotate_half(q) * row.sin[at][None]
    seen = torch.arange(keys.shape[1])[None, :] <= at[:, None]  # [q, L]: causal
    groups = q.shape[0] // keys.shape[0]
    scores = q @ keys.repeat_interleave(groups, dim=0).transpose(1, 2) * attn.scaling  # [H, q, L]
    w = torch.softmax(scores.masked_fill(~seen[None], float("-inf")), dim=-1)
    out = w @ values.repeat_interleave(groups, dim=0)  # [H, q, hd]
    h = h + attn.o_proj(out.transpose(0, 1).reshape(len(at), -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), w


def forward_rows(model: Any, row: _Row, picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[q, vocab]`` at the predicting positions ``picks`` of ``row``, and the last layer's attention
    there ``[heads, q, L]``. The first layer is frozen (no LoRA: :func:`lora_targets`), so the last layer's
    input is the one the bank captured, exactly as serving computes it; the last layer's keys and values
    are computed from it with the current weights."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer1 = lm.model.language_model.layers[1]
    h1 = row.h1  # [L, hidden]
    k1, v1 = _keys_values(layer1, h1, row.cos, row.sin)
    at = row.start + picks
    out, weights = _attend(layer1, h1[at], at, k1, v1, row)
    return lm.lm_head(lm.model.language_model.norm(out)), weights


def lora_targets(model: Any) -> str:
    """Every linear of the language model's layers but the first, and the LM head. The first layer stays
    the base's: a LoRA there changes the last layer's input at all of the prompt's 1,668 positions, which
    training cannot afford to recompute each step. Kept fixed (an earlier version trained it and kept the
    prompt's as the base computed it), held-out pages read 99.6% of characters teacher-forced but 58%
    served; frozen, what training measures is what serving does."""
    return r".*language_model\.layers\.[1-9]\d*\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)|lm_head"


def _picks(row: _Row, rng: random.Random, others: int) -> torch.Tensor:
    """Every character's and decision's predicting position, and ``others`` more of the answer's."""
    chars = {j for j, _ in row.looks} | set(row.decisions)
    rest = [j for j in range(len(row.labels)) if j not in chars]
    return torch.tensor(sorted(chars | set(rng.sample(rest, min(others, len(rest))))))


def train_ocr(
    model: Any, bank: PrefixBank, spec: OcrSpec, progress: Callable[[int, float, float], None] | None = None
) -> Any:
    """Train the LoRA on ``bank``; returns the PEFT model. ``progress(step, loss, attention loss)``."""
    from peft import LoraConfig, get_peft_model

    theta = model.config.text_config.rope_parameters["rope_theta"]
    if spec.rope_theta and theta != spec.rope_theta:
        raise ValueError(f"rope_theta is {theta}, not {spec.rope_theta}: call set_rope_theta before encoding")
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.rank, target_modules=lora_targets(model), lora_dropout=0.0)
    peft = get_peft_model(model, lora)
    peft.train()
    params = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if "lm_head" not in n], "lr": spec.lr},
        {"params": [p for n, p in params if "lm_head" in n], "lr": spec.lr * spec.head_lr},
    ]
    if spec.norm_lr:
        # the base model's own weights (peft wraps ``model``): merged and saved with it
        attn = model.model.language_model.layers[-1].self_attn
        norms = [attn.q_norm.weight, attn.k_norm.weight]
        for p in norms:
            p.requires_grad_(True)
        groups.append({"params": norms, "lr": spec.lr * spec.norm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / spec.steps))
    t0 = time.perf_counter()
    for step in range(spec.steps):
        logits_, labels_, looks = [], [], []
        for _ in range(spec.batch_size):
            row = bank.rows[rng.randrange(len(bank.rows))]
            picks = _picks(row, rng, spec.others)
            logits, weights = forward_rows(peft, row, picks)
            logits_.append(logits)
            labels_.append(row.labels[picks])
            if row.looks:  # picks hold every character's predicting index: where each look's query is
                j, k = torch.tensor(row.looks).T.contiguous()
                looks.append(weights[list(ATTEND_HEADS)][:, torch.searchsorted(picks, j), k].mean(0))
        ce = torch.nn.functional.cross_entropy(torch.cat(logits_), torch.cat(labels_))
        look = -torch.log(torch.cat(looks) + 1e-6).mean() if looks else ce.new_zeros(())
        loss = ce + spec.attend * look
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None and (step % 25 == 0 or step == spec.steps - 1):
            progress(step, float(ce.detach()), float(look.detach()))
    logger.info("ocr: trained %d steps in %.1fs", spec.steps, time.perf_counter() - t0)
    return peft


def teacher_forced(model: Any, bank: PrefixBank) -> tuple[float, float, float]:
    """Greedy decoding's page exact match, measured without decoding, and character accuracy.

    Greedy output equals the answer exactly when the model's top token is the answer's at every position
    given the answer so far: one pass per page. Returned: that exact match; the same on each character
    and ``_Row.choices`` (what the demo's output grammar leaves open between blocks; how it splits the
    markup into tokens is not counted); and the share of characters right.
    """
    exact, open_exact, chars, total = 0, 0, 0, 0
    with torch.no_grad():
        for row in bank.rows:
            top = forward_rows(model, row, torch.arange(len(row.labels)))[0].argmax(-1)
            right = top == row.labels
            exact += bool(right.all())
            hits = [bool(right[j]) for j, _ in row.looks]
            open_exact += all(hits) and all(bool(right[j]) for j in row.choices)
            chars += sum(hits)
            total += len(hits)
    n = max(1, len(bank.rows))
    return exact / n, open_exact / n, chars / max(1, total)


def save_merged(peft: Any, processor: Any, out: Path) -> Path:
    """Merge the LoRA into a copy of the weights in fp32 (safe merge: NaN refused) and save the full model."""
    merged = peft.merge_and_unload(safe_merge=True)
    merged.eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    return out


def evaluate_pages(
    engine: Engine, pages: Sequence[Page], adapter: str | None = None, batch: int = 8
) -> list[str]:
    """The model's greedy answers to ``pages`` (through the engine, as served)."""
    texts: list[str] = []
    for i in range(0, len(pages), batch):
        chunk = pages[i : i + batch]
        reqs = [
            GenerationRequest(client_view(p.image), OCR_LAYOUT_PROMPT, adapter, max_new_tokens=600)
            for p in chunk
        ]
        texts += [r.text for r in engine.generate(reqs)]
    return texts
