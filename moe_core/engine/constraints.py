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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from moe_core.engine.request import EngineError, InvalidInput
from moe_core.structured import MAX_GRAMMAR_CHARS, Constraint, GrammarError

__all__ = ["ConstraintError", "Grammar", "Grammars", "RowMatcher"]


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
    """One row's place in its grammar, and its allowed-token bitmask there once computed."""

    def __init__(self, grammar: Grammar, generated: Sequence[int] = ()) -> None:
        self.grammar = grammar
        self.matcher = grammar.pristine.deep_copy()
        if generated and not self.matcher.consume_tokens(list(generated)):
            raise EngineError(f"the row's tokens do not follow its grammar: {self.matcher.get_error()}")
        self.bitmask: np.ndarray | None = None  # [words] int32, for the row's next token

    def fill(self, words: int) -> None:
        """Compute the row's allowed tokens now, a bitmask of ``words`` int32 (the grammar thread's work)."""
        bitmask = np.empty(words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, words * 4)
        self.bitmask = bitmask

    def fill_into(self, out: np.ndarray, address: int, words: int) -> None:
        """The row's bitmask into ``out`` (``[words]`` int32 at ``address``): the one computed ahead, or now."""
        if self.bitmask is not None:
            out[:] = self.bitmask
        else:
            self.matcher.unsafe_compute_mask_ptr(address, words * 4)

    def accept(self, token: int) -> bool:
        """Advance over ``token``; False when the grammar does not allow it (the row cannot go on)."""
        self.bitmask = None
        return bool(self.matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (not even the end of sequence)."""
        return bool(self.matcher.is_stopped())


class Grammars:
    """The engine's grammar compiler: its tokenizer as llguidance sees it, the LRU of compiled
    grammars, and counters (compiles, cache hits, compile and mask time) for the metrics."""

    def __init__(
        self,
        tokenizer: Any,
        vocab: int,
        eos: Sequence[int],
        capacity: int,
        *,
        overlap: bool = False,
    ) -> None:
        self.vocab = vocab  # the logits' width (may exceed the tokenizer's: padding rows of the head)
        self.eos = list(eos)
        self.overlap = overlap  # compute masks during the forward (a CUDA device)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(eos))
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._prefetch: Future[None] | None = None
        self.stats = {
            "grammar_compiles": 0,
            "grammar_cache_hits": 0,
            "grammar_compile_us": 0,
            "grammar_mask_us": 0,  # on the step's path: waiting for, unpacking and applying masks
            "grammar_fill_us": 0,  # computing masks on the grammar thread, during the forward
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

    def prefetch(self, matchers: Sequence[RowMatcher]) -> None:
        """With ``overlap`` (a CUDA device: the forward leaves the CPU idle), start computing these rows'
        masks on the grammar thread while the step's forward runs (a row's mask depends on its tokens so
        far, not on the logits); :meth:`mask` waits for them. On the CPU the forward holds the cores, so
        the masks are computed in :meth:`mask` instead (measured: overlapping there made steps slower)."""
        if not self.overlap or not matchers:
            return
        words = (self.vocab + 31) // 32

        def fill() -> None:
            t0 = time.perf_counter()
            for m in matchers:
                m.fill(words)
            self.stats["grammar_fill_us"] += int((time.perf_counter() - t0) * 1e6)

        self._prefetch = self._filler.submit(fill)

    def mask(
        self,
        logits: torch.Tensor,
        matchers: Sequence[RowMatcher | None],
        blocks_eos: Sequence[bool] = (),
    ) -> torch.Tensor:
        """``logits`` ``[rows, vocab]`` with what each row may not pick now at ``-inf``: the tokens its
        grammar forbids, and the end of sequence where ``blocks_eos[i]`` (before ``min_tokens``, or
        ``ignore_eos``; left allowed when the grammar allows nothing else). Rows without either keep their
        logits; the input is not changed (a copy is returned when anything is masked)."""
        constrained = [i for i, m in enumerate(matchers) if m is not None]
        blocked = [i for i, b in enumerate(blocks_eos) if b]
        if not constrained and not blocked:
            return logits
        t0 = time.perf_counter()
        rows, vocab = logits.shape
        # built in numpy: a batch's few small index operations cost a microsecond each there, ten in torch
        allowed = np.ones((rows, vocab), dtype=bool)
        if constrained:
            if self._prefetch is not None:  # the masks computed during the forward
                self._prefetch.result()
                self._prefetch = None
            words = (self.vocab + 31) // 32
            bitmask = np.empty((len(constrained), words), dtype=np.int32)  # [constrained, words]
            base = bitmask.ctypes.data
            for k, i in enumerate(constrained):
                m = matchers[i]
                assert m is not None
                m.fill_into(bitmask[k], base + 4 * words * k, words)
            bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
            bits = bits.view(bool)  # [constrained, vocab]
            none = ~bits.any(axis=1)
            if none.any():  # a grammar in error allows nothing: the row ends
                bits[none, self.eos[0]] = True
            allowed[constrained] = bits
        if blocked:
            eos = self.eos
            keep = allowed[np.ix_(blocked, eos)].copy()
            allowed[np.ix_(blocked, eos)] = False
            still = np.asarray(allowed[blocked].any(axis=1))
            only_end = [not x for x in still.tolist()]  # the grammar allows only the end
            if any(only_end):  # ... it wins
                back = [b for b, o in zip(blocked, only_end, strict=True) if o]
                allowed[np.ix_(back, eos)] = keep[np.array(only_end)]
        out = logits.masked_fill(torch.from_numpy(~allowed), float("-inf"))
        if constrained:
            self.stats["grammar_mask_us"] += int((time.perf_counter() - t0) * 1e6)
            self.stats["grammar_masked_tokens"] += len(constrained)
        return out
