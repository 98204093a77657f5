"""Constrained decoding: grammars compiled once per content, a matcher per row, a mask per step.

The grammar engine is llguidance (a Rust library with a CPU engine and no Python dependencies; the
README records why, with the figures measured against xgrammar). :class:`Grammars` compiles a
:class:`~moe_core.structured.Constraint` into an llguidance grammar and keeps a pristine matcher for it
in a bounded LRU keyed by the constraint's content, so the same schema sent again costs a copy, not a
compile. Each constrained row gets its own :class:`RowMatcher` when it is admitted (rebuilt from its
generated tokens if it ever has none, e.g. after a preemption); in each step :meth:`Grammars.mask`
sets every token a constrained row's grammar forbids to ``-inf`` in that row's logits, leaving the
other rows of the batch untouched, and the scheduler advances each matcher with the token picked.

JSON is generated (:meth:`Constraint.grammar_text <moe_core.structured.Constraint.grammar_text>`) compactly and deterministically, the way ``json.dumps`` writes it (``", "`` and
``": "``, no other whitespace): a sampling model cannot wander into endless whitespace, and a tool
call's arguments read as Qwen's chat template writes them back.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from moe_core.engine.request import EngineError, InvalidInput
from moe_core.structured import MAX_GRAMMAR_CHARS, Constraint, GrammarError

__all__ = ["GRAMMAR_CACHE_SIZE", "ConstraintError", "Grammar", "Grammars", "RowMatcher"]

#: Compiled grammars kept per engine (least recently used dropped first).
GRAMMAR_CACHE_SIZE = 128


class ConstraintError(InvalidInput):
    """A constraint that does not compile (an invalid or unsupported schema, regex or grammar);
    ``param`` is the request field it came from."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar: a matcher at its start, copied for each row."""

    key: tuple[str, str]
    pristine: llguidance.LLMatcher
    compile_s: float


class RowMatcher:
    """One row's place in its grammar."""

    def __init__(self, grammar: Grammar, generated: Sequence[int] = ()) -> None:
        self.grammar = grammar
        self.matcher = grammar.pristine.deep_copy()
        if generated and not self.matcher.consume_tokens(list(generated)):
            raise EngineError(f"the row's tokens do not follow its grammar: {self.matcher.get_error()}")

    def accept(self, token: int) -> bool:
        """Advance over ``token``; False when the grammar does not allow it (the row cannot go on)."""
        return bool(self.matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (not even the end of sequence)."""
        return bool(self.matcher.is_stopped())


class Grammars:
    """The engine's grammar compiler: its tokenizer as llguidance sees it, the LRU of compiled
    grammars, and counters (compiles, cache hits, compile and mask time) for the metrics."""

    def __init__(
        self, tokenizer: Any, vocab: int, eos: Sequence[int], capacity: int = GRAMMAR_CACHE_SIZE
    ) -> None:
        self.vocab = vocab  # the logits' width (may exceed the tokenizer's: padding rows of the head)
        self.eos = list(eos)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(eos))
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {
            "grammar_compiles": 0,
            "grammar_cache_hits": 0,
            "grammar_compile_us": 0,
            "grammar_mask_us": 0,
            "grammar_masked_tokens": 0,
            "constrained_rows": 0,
        }

    def compile(self, constraint: Constraint) -> Grammar:
        """The compiled grammar of ``constraint`` (from the cache when its content was seen before);
        :class:`ConstraintError` naming its field when it does not compile. Safe from any thread."""
        with self._lock:
            hit = self._cache.get(constraint.key)
            if hit is not None:
                self._cache.move_to_end(constraint.key)
                self.stats["grammar_cache_hits"] += 1
                return hit
        if len(constraint.value) > MAX_GRAMMAR_CHARS:
            raise ConstraintError(
                constraint.param, f"{len(constraint.value)} characters, over the limit of {MAX_GRAMMAR_CHARS}"
            )
        t0 = time.perf_counter()
        try:
            text = constraint.grammar_text()
        except GrammarError as e:
            raise ConstraintError(constraint.param, str(e)) from e
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ConstraintError(constraint.param, f"does not compile: {matcher.get_error().strip()}")
        seconds = time.perf_counter() - t0
        grammar = Grammar(constraint.key, matcher, seconds)
        with self._lock:
            self.stats["grammar_compiles"] += 1
            self.stats["grammar_compile_us"] += int(seconds * 1e6)
            self._cache[constraint.key] = grammar
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return grammar

    def matcher(
        self, grammar: Grammar, generated: Sequence[int] = (), *, resumed: bool = False
    ) -> RowMatcher:
        """A row's matcher, advanced over the tokens the row already generated (``resumed``: a row
        preempted and admitted again, counted once)."""
        if not resumed:
            self.stats["constrained_rows"] += 1
        return RowMatcher(grammar, generated)

    def mask(
        self,
        logits: torch.Tensor,
        matchers: Sequence[RowMatcher | None],
        blocked: Sequence[Sequence[int]] = (),
    ) -> torch.Tensor:
        """``logits`` ``[rows, vocab]`` with what each row may not pick now at ``-inf``: the tokens its
        grammar forbids and ``blocked[i]`` (its end-of-sequence ids before ``min_tokens``; left allowed when
        the grammar allows nothing else). Rows without a matcher keep their logits; the input is not
        changed (a copy is returned when anything is masked)."""
        constrained = [i for i, m in enumerate(matchers) if m is not None]
        if not constrained and not any(blocked):
            return logits
        t0 = time.perf_counter()
        rows, vocab = logits.shape
        words = (self.vocab + 31) // 32
        bitmask = torch.full((rows, words), -1, dtype=torch.int32)  # [rows, words]: free rows allow all
        for i in constrained:
            m = matchers[i]
            assert m is not None
            m.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        allowed = torch.from_numpy(bits).bool()  # [rows, vocab]
        if constrained:  # a grammar in error allows nothing: the row ends
            allowed[~allowed.any(-1), self.eos[0]] = True
        for i, ids in enumerate(blocked):
            if ids:
                keep = allowed[i, list(ids)].clone()
                allowed[i, list(ids)] = False
                if not allowed[i].any():  # the grammar allows only the end: it wins
                    allowed[i, list(ids)] = keep
        out = logits.masked_fill(~allowed, float("-inf"))
        if constrained:
            self.stats["grammar_mask_us"] += int((time.perf_counter() - t0) * 1e6)
            self.stats["grammar_masked_tokens"] += len(constrained)
        return out
