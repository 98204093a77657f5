"""What runs in one step of continuous batching over the paged KV cache: admission by memory, chunked
prefill, prefix reuse and preemption (vLLM's scheduler, in small).

:class:`StepPlanner` holds one engine's waiting requests and running rows. Each step it plans one packed
forward, runs it and advances every row:

1. every decoding row gets one token; a row whose last page is full gets a new page, and when the pool
   has none the youngest running row is preempted (its pages freed, its request put back at the head of
   the queue to be read again later, its tokens so far kept) instead of anything failing;
2. rows still reading their prompt get the next chunk, within ``max_prefill_tokens_per_step`` tokens
   for the whole step, so a burst of long screenshot prompts delays running streams by one chunk;
3. waiting requests are admitted in arrival order while their prompt's pages fit (after the pages a
   prefix match shares with earlier requests) and ``max_running`` allows; otherwise they wait.

A finished row leaves at once and its pages are free for the next step; full pages stay registered in
the prefix table for later requests with the same prefix (an agent's next turn). A step that fails is
retried by halves, so one bad row (an error, an out-of-memory, non-finite logits) fails only itself.

The :class:`~moe_core.engine.scheduler.Scheduler` (a :class:`StepPlanner`) adds the bounded queue, the
loop thread and the asyncio API, and runs the steps (:meth:`~moe_core.engine.scheduler.Scheduler.iterate`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moe_core.engine.outputs import advance, score
from moe_core.engine.request import EngineError, PromptTooLong
from moe_core.engine.runner import RowWork
from moe_core.engine.sampling import TextStream, make_generator
from moe_core.engine.sequence import Job, Seq

if TYPE_CHECKING:
    from moe_core.engine.core import Engine

__all__ = ["StepPlanner", "StepRecord"]

logger = logging.getLogger("moe_core.engine.scheduler")  # the scheduler's records, as before the split


@dataclass(frozen=True)
class StepRecord:
    """What one step ran: the decoding rows and each prompt chunk (request id, tokens)."""

    decode: tuple[str, ...]
    prefill: tuple[tuple[str, int], ...]


class StepPlanner:
    """The waiting requests and running rows of one :class:`~moe_core.engine.core.Engine`, and the steps
    over them: plan (:meth:`_plan`), run (:meth:`_forward`) and advance (:meth:`_finish`). All run under the
    engine's lock; planning and advancing (they change the queue and the rows) under the scheduler's
    condition too."""

    def __init__(self, engine: Engine, *, max_running: int, name: str) -> None:
        self.engine = engine
        self.max_running = max_running
        self.name = name or engine.name
        kv = engine.settings.kv
        self.page_tokens = engine.kv.layout.page_tokens
        self.max_prefill_tokens = kv.max_prefill_tokens_per_step
        self._waiting: deque[Job] = deque()
        self._running: list[Seq] = []  # admission order: oldest first
        self._admitted = 0
        self._eos = set(engine.eos_token_ids)
        self.steps = 0  # engine steps run
        self.preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.prompt_tokens_computed = 0  # prompt tokens read by the model
        self.rows_per_step: dict[int, int] = {}  # rows in a step -> steps
        self.history: deque[StepRecord] = deque(maxlen=512)

    # -------------------------------------------------------------- planning
    def _plan(self) -> list[tuple[Seq, RowWork]]:
        """This step's rows: decoding rows, then prompt chunks, then newly admitted requests."""
        for seq in [s for s in self._running if s.job.cancelled]:
            self._drop(seq, None)
        plan: list[tuple[Seq, RowWork]] = []
        budget = self.max_prefill_tokens
        i = 0
        while i < len(self._running):  # 1. a token for every decoding row, oldest first
            seq = self._running[i]
            if seq.prefilled:
                if not self._grow(seq, seq.computed + 1):
                    continue  # it was preempted (or failed): the list shifted
                plan.append((seq, seq.work(1, decode=True)))
            i += 1
        for seq in self._running:  # 2. the next chunk of rows reading their prompt
            if not seq.prefilled and budget > 0:
                n = min(len(seq.tokens) - seq.computed, budget)
                plan.append((seq, seq.work(n, decode=False)))
                budget -= n
        while self._waiting and len(self._running) < self.max_running and budget > 0:  # 3. admit
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            try:
                admitted = self._admit(job)
            except EngineError as e:  # its adapter went away: it fails alone
                self._waiting.popleft()
                job.sink(e)
                continue
            if admitted is None:
                break  # its pages do not fit now: it (and everything after it) waits
            self._waiting.popleft()
            n = min(len(admitted.tokens) - admitted.computed, budget)
            plan.append((admitted, admitted.work(n, decode=False)))
            budget -= n
        return plan

    def _admit(self, job: Job) -> Seq | None:
        """Take ``job`` in if its prompt's pages fit beside the running rows' next pages."""
        engine = self.engine
        seq = job.seq
        if seq is None:
            adapter = job.request.adapter
            engine.check_adapters([adapter])
            identity = engine.identity(adapter)
            seq = Seq(
                job,
                list(job.prompt.ids),
                hashlib.blake2b(identity.encode(), digest_size=16).digest(),
                engine.vision_identity(adapter),
                None if job.labels else TextStream(engine.processor.tokenizer, job.params.stop),
                None if job.labels else make_generator(job.params, engine.device),
            )
        if job.grammar is not None and seq.matcher is None:  # new, or resumed without one: from its tokens
            seq.matcher = engine.grammars.matcher(
                job.grammar, seq.tokens[len(job.prompt) :], resumed=job.started > 0.0
            )
        p = self.page_tokens
        reusable = (len(seq.tokens) - 1) // p  # the last token is always computed: its logits are needed
        seq.hash_upto(reusable, self.page_tokens)
        hits = engine.pages.match(seq.hashes[:reusable])
        need = -(-len(seq.tokens) // p) - len(hits)
        reserve = sum(1 for s in self._running if s.prefilled)  # each decoding row may need a page soon
        if need + reserve > engine.pages.available:
            engine.pages.release(hits)
            return None
        seq.pages = hits + engine.pages.allocate(need)
        seq.computed = len(hits) * p
        seq.registered = len(hits)
        seq.prefilled = False
        if job.started == 0.0:
            job.started = time.perf_counter()
            seq.cached_tokens = seq.computed
            self.prefix_hit_tokens += seq.computed
        self._admitted += 1
        seq.order = self._admitted
        job.seq = seq
        self._running.append(seq)
        return seq

    def _grow(self, seq: Seq, tokens: int) -> bool:
        """Pages for ``tokens`` tokens of ``seq``, preempting the youngest running rows when the pool is
        out; False when ``seq`` itself had to go."""
        pages = self.engine.pages
        while len(seq.pages) * self.page_tokens < tokens:
            if pages.available == 0:
                victim = max(self._running, key=lambda s: s.order)
                if victim is seq and len(self._running) == 1:
                    self._drop(
                        seq,
                        PromptTooLong(
                            f"the answer outgrew the KV cache ({len(seq.tokens)} tokens in "
                            f"{pages.pages} pages of {self.page_tokens})"
                        ),
                    )
                    return False
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.pages += pages.allocate(1)
        return True

    def _preempt(self, seq: Seq) -> None:
        """Free ``seq``'s pages and put its request back at the head of the queue (its tokens kept)."""
        self._running.remove(seq)
        self.engine.pages.release(seq.pages)
        seq.pages, seq.computed, seq.registered, seq.prefilled = [], 0, 0, False
        seq.features.clear()
        seq.matcher = None  # rebuilt from its tokens when it is admitted again
        self._waiting.appendleft(seq.job)
        self.preemptions += 1
        logger.info(
            "%s: %s: preempted (KV cache full), %d tokens kept", self.name, seq.request_id, len(seq.tokens)
        )

    def _drop(self, seq: Seq, error: BaseException | None) -> None:
        """``seq`` leaves: its pages go back (unregistered if it failed), its sink gets ``error``."""
        if seq in self._running:
            self._running.remove(seq)
        if error is not None:
            self.engine.pages.forget(seq.pages)
            seq.job.sink(error)
        self.engine.pages.release(seq.pages)
        seq.pages = []
        seq.features.clear()

    # ------------------------------------------------------------- running
    def _forward(self, plan: list[tuple[Seq, RowWork]]) -> dict[int, torch.Tensor | BaseException]:
        """Logits per asking row (by ``id`` of its seq), or the error that row alone caused: a failed
        forward is retried by halves, so one bad row fails only itself."""
        try:
            logits = self.engine.runner.forward([w for _, w in plan])
        except Exception as e:
            if len(plan) == 1:
                seq = plan[0][0]
                logger.warning("%s: %s: request failed in a step: %s", self.name, seq.request_id, e)
                return {id(seq): e if isinstance(e, EngineError | ValueError) else EngineError(str(e))}
            half = len(plan) // 2
            return self._forward(plan[:half]) | self._forward(plan[half:])
        asked = [seq for seq, w in plan if w.logits]
        return {id(seq): logits[k] for k, seq in enumerate(asked)}

    def _finish(
        self, plan: list[tuple[Seq, RowWork]], results: dict[int, torch.Tensor | BaseException]
    ) -> None:
        """Advance every row of a step: record its KV, register its full pages, sample, send, finish."""
        self.steps += 1
        rows = len(plan)
        self.rows_per_step[rows] = self.rows_per_step.get(rows, 0) + 1
        self.history.append(
            StepRecord(
                tuple(s.request_id for s, w in plan if w.decode),
                tuple((s.request_id, len(w.ids)) for s, w in plan if not w.decode),
            )
        )
        n_adapters = len({s.adapter for s, _ in plan})
        asked = [r for r in results.values() if isinstance(r, torch.Tensor)]
        finite = iter(torch.isfinite(torch.stack(asked)).all(-1).tolist() if asked else [])
        ok = {k: next(finite) for k, r in results.items() if isinstance(r, torch.Tensor)}
        sampling: list[tuple[Seq, torch.Tensor]] = []
        for seq, work in plan:
            result = results.get(id(seq))
            if isinstance(result, BaseException):
                self._drop(seq, result)
                continue
            if seq not in self._running:
                continue
            seq.computed += len(work.ids)
            if not work.decode:
                self.prompt_tokens_computed += len(work.ids)
            seq.most_rows, seq.most_adapters = max(seq.most_rows, rows), max(seq.most_adapters, n_adapters)
            seq.register(self.engine.pages, self.page_tokens)
            if result is None:
                continue
            if not ok[id(seq)]:
                self._drop(seq, EngineError("the model produced non-finite logits for this request"))
                continue
            seq.prefilled = True
            seq.features.clear()
            if seq.job.labels:
                self._drop(seq, None)
                seq.job.sink(score(self.engine, seq.job, result))
                continue
            sampling.append((seq, result))
        if sampling:
            advance(self.engine, self._eos, sampling, self._drop)
