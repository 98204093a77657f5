"""Per-row generation settings: greedy or seeded sampling, token limits, stop strings, streamed text.

Every row of a batch carries its own :class:`~moe_core.generation.SamplingParams`; :func:`next_tokens`
picks each row's next token from the batch's last-position logits (greedy rows by ``argmax``, exactly as
``generate`` does; sampled rows with their own seeded generator, so a seed gives the same text whatever else is batched),
after the row's penalties (repetition, presence, frequency, as vLLM applies them) and its ``top_k`` /
``top_p``. :func:`token_logprobs` reports the chosen token's log probability and the most likely
alternatives from the model's raw logits (before penalties, grammar masks and temperature, as vLLM does).
:class:`TextStream` turns a row's tokens into text as they come: it never sends half a UTF-8 character,
holds back what may be the start of a stop string, and ends the text before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_core.answers import FinishReason, TokenLogprob
from moe_core.generation import MAX_TOP_LOGPROBS, SamplingParams

__all__ = [
    "MAX_TOP_LOGPROBS",
    "FinishReason",
    "SamplingParams",
    "TextStream",
    "TokenLogprob",
    "TokenTexts",
    "make_generator",
    "next_tokens",
    "token_logprobs",
]


class TokenTexts:
    """Each token as text, as logprobs name it: decoded once (on the engine's thread)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], asked: Sequence[int | None], text: Any
) -> list[TokenLogprob | None]:
    """Each asking row's chosen-token log probability and top ``asked[i]`` alternatives, from ``logits``
    ``[rows, vocab]`` (the model's raw ones); ``text(id)`` names a token."""
    rows = [i for i, k in enumerate(asked) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if not rows:
        return out
    logp = torch.log_softmax(logits[rows].float(), -1)  # [asking rows, vocab]
    k = max(int(asked[i] or 0) for i in rows)
    top_v, top_i = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    chosen = logp[torch.arange(len(rows)), torch.tensor([tokens[i] for i in rows])].tolist()
    for r, i in enumerate(rows):
        n = int(asked[i] or 0)
        top = tuple((text(t), v) for t, v in zip(top_i[r, :n].tolist(), top_v[r, :n].tolist(), strict=True))
        out[i] = TokenLogprob(text(tokens[i]), chosen[r], top)
    return out


def _penalize(logits: torch.Tensor, p: SamplingParams, seen: Sequence[int], answer: Sequence[int]) -> None:
    """vLLM's penalties on one row's logits ``[vocab]``, in place: repetition over the prompt and the
    answer (positive logits divided by it, negative ones multiplied), presence and frequency over the answer."""
    if p.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(set(seen)))
        v = logits[ids]
        logits[ids] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and answer:
        ids, counts = torch.tensor(list(answer)).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The row's own random stream (seeded when the request names a seed); None for greedy rows."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    blocked: Sequence[Sequence[int]] = (),
    history: Sequence[tuple[Sequence[int], int]] = (),
) -> list[int]:
    """Each row's next token from ``logits`` ``[rows, vocab]`` (fp32). ``blocked[i]``: token ids row ``i``
    may not pick now (its end-of-sequence ids before ``min_tokens``); ``history[i]``: row ``i``'s tokens
    and where its answer starts in them (for its penalties)."""
    logits = logits.float()
    penalized = [i for i, p in enumerate(params) if p.penalized and history]
    if blocked or penalized:
        logits = logits.clone()
        for i in penalized:
            tokens, start = history[i]
            _penalize(logits[i], params[i], tokens, tokens[start:])
        for i, ids in enumerate(blocked):
            if ids:
                logits[i, list(ids)] = float("-inf")
    out = logits.argmax(-1).tolist()  # greedy rows: what generate(do_sample=False) picks
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = _filtered_probs(logits[sampled], [params[i] for i in sampled])
        for row, i in enumerate(sampled):  # each row draws from its own (seeded) random stream
            out[i] = int(torch.multinomial(probs[row], 1, generator=generators[i]))
    return [int(t) for t in out]


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Sampling probabilities ``[rows, vocab]`` of the sampled rows after each row's temperature,
    ``top_k`` and ``top_p``, for all rows at once (one sort, however many rows sample): unnormalised where
    filtered, as ``torch.multinomial`` takes them."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    scaled = logits / temperature[:, None]
    vocab = scaled.shape[-1]
    k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(k):
        top = scaled.sort(-1, descending=True).values  # the k-th largest of each row, its threshold
        kth = top.gather(1, torch.tensor([max(n, 1) - 1 for n in k], device=device)[:, None])
        off = torch.tensor([n == 0 for n in k], device=device)[:, None]
        scaled = scaled.masked_fill((scaled < kth) & ~off, float("-inf"))
    probs = torch.softmax(scaled, -1)
    top_p = [p.top_p for p in params]
    if any(t < 1.0 for t in top_p):
        sorted_probs, order = probs.sort(-1, descending=True)
        limit = torch.tensor(top_p, device=device, dtype=probs.dtype)[:, None]
        keep = (sorted_probs.cumsum(-1) - sorted_probs < limit) | (
            limit >= 1.0
        )  # the smallest set reaching it
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(~keep, 0.0))
    return probs


@dataclass
class TextStream:
    """A row's generated text, released as it becomes final.

    Detokenized incrementally, as vLLM does: each token decodes a short window (the tokens since the
    last text released, after a few tokens of context) instead of the whole answer again, so a token
    costs the same at the end of a long answer as at its start."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the whole text so far (before any stop string), leading whitespace dropped
    sent: int = 0  # characters of ``text`` released
    stopped: bool = False  # a stop string was found: ``text`` ends before it
    raw: str = ""  # everything decoded so far
    _prefix: int = 0  # ids[_prefix:_read] are the context the next window decodes after
    _read: int = 0  # ids before it are in ``raw``

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def add(self, token: int) -> str:
        """Append ``token``; returns the newly final text (may be empty)."""
        self.ids.append(token)
        context = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if window.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next bytes
            return ""
        self.raw += window[len(context) :]
        self._prefix, self._read = max(0, self._read - 4), len(self.ids)
        self.text = self.raw.lstrip()  # the answer is stripped, as the whole-text answer always was
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        safe = min(len(self.text) - self._held_back(), len(self.text.rstrip()))  # trailing space may end it
        new, self.sent = self.text[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return new

    def flush(self) -> str:
        """The rest of the text (the row ended), trailing whitespace dropped."""
        self.text = self.text.rstrip()
        new, self.sent = self.text[self.sent :], max(self.sent, len(self.text))
        return new

    def _held_back(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
