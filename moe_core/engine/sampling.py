"""Per-row generation settings: greedy or seeded sampling, token limits, stop strings, streamed text.

Every row of a batch carries its own :class:`SamplingParams`; :func:`next_tokens` picks each row's next
token from the batch's last-position logits (greedy rows by ``argmax``, exactly as ``generate`` does;
sampled rows with their own seeded generator, so a seed gives the same text whatever else is batched).
:class:`TextStream` turns a row's tokens into text as they come: it never sends half a UTF-8 character,
holds back what may be the start of a stop string, and ends the text before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["FinishReason", "SamplingParams", "TextStream", "make_generator", "next_tokens"]

#: Why a row ended: ``stop`` (end of sequence or a stop string) or ``length`` (its token limit).
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """One row's generation settings; the defaults are greedy decoding up to the engine's limit."""

    max_tokens: int | None = None  # None: the engine's max_new_tokens
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # end of sequence is ignored before this many tokens (benchmarks' fixed lengths)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be within 0..2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
) -> list[int]:
    """Each row's next token from ``logits`` ``[rows, vocab]`` (fp32). ``blocked[i]``: token ids row ``i``
    may not pick now (its end-of-sequence ids before ``min_tokens``)."""
    logits = logits.float()
    if blocked:
        logits = logits.clone()
        for i, ids in enumerate(blocked):
            if ids:
                logits[i, list(ids)] = float("-inf")
    out = logits.argmax(-1).tolist()  # greedy rows: what generate(do_sample=False) picks
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i] / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        out[i] = int(torch.multinomial(probs, 1, generator=g))
    return [int(t) for t in out]


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
