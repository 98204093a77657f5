"""Step scheduling (continuous batching) over the paged KV cache: admission by memory, chunked prefill,
prefix reuse and preemption.

One :class:`Scheduler` per model replica runs a loop on its own thread. Each step it plans one packed
forward (vLLM's scheduler, in small):

1. every decoding row gets one token; a row whose last page is full gets a new page, and when the pool
   has none the youngest running row is preempted (its pages freed, its request put back at the head of
   the queue to be read again later, its tokens so far kept) instead of anything failing;
2. rows still reading their prompt get the next chunk, within ``max_prefill_tokens_per_step`` tokens
   for the whole step, so a burst of long screenshot prompts delays running streams by one chunk;
3. waiting requests are admitted in arrival order while their prompt's pages fit (after the pages a
   prefix match shares with earlier requests) and ``max_running`` allows; otherwise they wait. A full
   queue is refused at once (:class:`QueueFull`).

A finished row leaves at once and its pages are free for the next step; full pages stay registered in
the prefix table for later requests with the same prefix (an agent's next turn). Prompts are built
(template, tokenization, image resize and patches) on the caller's side, outside the engine's lock.
A step that fails is retried by halves, so one bad row (an error, an out-of-memory, non-finite logits)
fails only itself. Classification (the routing adapter) runs through the same loop as a prefill-only row.

:meth:`Scheduler.stream` is an async iterator of :class:`Delta` per request, :meth:`Scheduler.generate`
its collected result; :func:`run_batch` runs a list of requests to completion on the calling thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moe_core.engine.constraints import Grammar
from moe_core.engine.outputs import advance, score
from moe_core.engine.prompts import Prompt
from moe_core.engine.request import (
    ClassifyResult,
    Completion,
    Delta,
    EngineError,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
)
from moe_core.engine.runner import RowWork
from moe_core.engine.sampling import SamplingParams, TextStream, TokenLogprob, make_generator
from moe_core.engine.sequence import Job, Seq

if TYPE_CHECKING:
    from moe_core.engine.core import Engine

__all__ = ["Scheduler", "StepRecord", "run_batch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """What one step ran: the decoding rows and each prompt chunk (request id, tokens)."""

    decode: tuple[str, ...]
    prefill: tuple[tuple[str, int], ...]


class Scheduler:
    """Continuous batching over one :class:`~moe_core.engine.core.Engine` (its own thread)."""

    def __init__(
        self, engine: Engine, *, max_running: int = 16, max_queued: int = 64, name: str = ""
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"need max_running >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        self.engine = engine
        self.max_running, self.max_queued = max_running, max_queued
        self.name = name or engine.name
        kv = engine.settings.kv
        self.page_tokens = engine.kv.layout.page_tokens
        self.max_prefill_tokens = kv.max_prefill_tokens_per_step
        self._waiting: deque[Job] = deque()
        self._running: list[Seq] = []  # admission order: oldest first
        self._pending: list[GenerationRequest] = []  # submitted, prompt being built off the event loop
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._admitted = 0
        self._eos = set(engine.eos_token_ids)
        self.steps = 0  # engine steps run
        self.prefills = 0  # prompt chunks read
        self.preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.prompt_tokens_computed = 0  # prompt tokens read by the model
        self.rows_per_step: dict[int, int] = {}  # rows in a step -> steps
        self.history: deque[StepRecord] = deque(maxlen=512)

    # ------------------------------------------------------------------ state
    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def in_use(self) -> set[str]:
        """Adapters of queued and running requests: their slots must not change under them."""
        with self._cond:
            requests = [s.job.request for s in self._running] + [j.request for j in self._waiting]
            requests += self._pending
        return {r.adapter for r in requests if r.adapter is not None}

    def stats(self) -> dict[str, int]:
        """Queue, rows and KV pages now, and counters since start (for metrics)."""
        pages = self.engine.pages
        return {
            "queued": len(self._waiting),
            "running": len(self._running),
            "kv_pages_total": pages.pages,
            "kv_pages_used": pages.used,
            "kv_pages_cached": pages.cached,
            "preemptions": self.preemptions,
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            **self.engine.grammars.stats,  # constrained rows, grammar compiles, cache hits, compile and mask time
        }

    def healthy(self) -> bool:
        """The loop thread runs (or has not been needed yet) and the scheduler is not closed."""
        return not self._closed and (self._thread is None or self._thread.is_alive())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is None:
            self._fail_all(QueueFull(f"{self.name}: shutting down"))

    # -------------------------------------------------------------- requests
    def check(self, request: GenerationRequest, *, limit: bool = True) -> Prompt:
        """Build ``request``'s prompt and check it on its own: valid unicode (else ``UnicodeEncodeError``),
        within the serving token limit (unless ``limit`` is off) and the KV cache (else
        :class:`PromptTooLong`). Runs outside any lock."""
        prompt = self.engine.prompts.build(request)
        most = self.engine.settings.max_prompt_tokens
        image_tokens = sum(im.tokens for im in prompt.images)
        if limit and len(prompt) > most:
            raise PromptTooLong(
                f"the prompt is {len(prompt)} tokens ({image_tokens} image tokens), over the limit of {most}"
            )
        pages = -(-(len(prompt) + 1) // self.page_tokens)
        if pages > self.engine.pages.pages:
            raise PromptTooLong(
                f"the prompt is {len(prompt)} tokens: {pages} KV cache pages, more than the "
                f"{self.engine.pages.pages} this replica has"
            )
        return prompt

    def _prepare(self, request: GenerationRequest, params: SamplingParams) -> tuple[Prompt, Grammar | None]:
        """:meth:`check`, the answer's grammar (compiled, or from the cache) and the patches of every image
        whose features are not kept now (a worker thread's work, not the engine loop's); the others are
        covered by the feature cache or, when that let them go, made in the step that needs them."""
        prompt = self.check(request)
        engine = self.engine
        grammar = engine.grammars.compile(params.constraint) if params.constraint is not None else None
        vision = engine.vision_identity(request.adapter)
        engine.prompts.make_pixels([im for im in prompt.images if (im.key, vision) not in engine.features])
        return prompt, grammar

    def _room(self) -> None:
        if self._closed:
            raise QueueFull(f"{self.name}: shutting down")
        running = len(self._running)
        if len(self._waiting) >= self.max_queued + max(0, self.max_running - running):
            raise QueueFull(
                f"{self.name}: {len(self._waiting)} requests queued and {running} running, the most "
                "this replica takes; retry later"
            )

    def submit(
        self,
        request: GenerationRequest,
        params: SamplingParams,
        sink: Callable[[Any], None],
        *,
        request_id: str = "",
        labels: Sequence[str] = (),
        prompt: Prompt | None = None,
        grammar: Grammar | None = None,
    ) -> Job:
        """Queue one request; ``sink`` gets its deltas (from the scheduler's thread). Raises at once for
        a request that cannot run (:class:`QueueFull`, :class:`PromptTooLong`, ``UnicodeEncodeError``,
        :class:`~moe_core.engine.constraints.ConstraintError`)."""
        with self._cond:
            self._room()
        if prompt is None:
            prompt, grammar = self._prepare(request, params)
        job = Job(request, params, sink, prompt, request_id, tuple(labels), grammar=grammar)
        with self._cond:
            self._room()
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"scheduler-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return job

    def enqueue(
        self,
        request: GenerationRequest,
        params: SamplingParams,
        sink: Callable[[Any], None],
        *,
        request_id: str = "",
        limit: bool = True,
    ) -> None:
        """Queue one request without starting the loop thread: whoever calls :meth:`iterate` runs it
        (:func:`run_batch`, tests that step the scheduler). ``limit`` off skips the serving token limit."""
        grammar = self.engine.grammars.compile(params.constraint) if params.constraint is not None else None
        job = Job(request, params, sink, self.check(request, limit=limit), request_id, grammar=grammar)
        with self._cond:
            self._waiting.append(job)

    async def _submit(
        self, request: GenerationRequest, params: SamplingParams, sink: Callable[[Any], None], **kw: Any
    ) -> Job:
        """:meth:`submit` with the prompt built on a worker thread: the event loop never waits for it."""
        with self._cond:
            self._room()
            self._pending.append(request)  # its adapter counts as in use from now: never evicted meanwhile
        try:
            prompt, grammar = await asyncio.to_thread(self._prepare, request, params)
            return self.submit(request, params, sink, prompt=prompt, grammar=grammar, **kw)
        finally:
            with self._cond:
                self._pending.remove(request)

    async def stream(
        self, request: GenerationRequest, params: SamplingParams | None = None, *, request_id: str = ""
    ) -> AsyncIterator[Delta]:
        """The request's new text as it is decoded; the last delta has the finish reason and usage.
        Leaving the iteration early (a client gone) cancels the request at the next step."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = await self._submit(
            request,
            params or SamplingParams(),
            lambda item: _deliver(loop, queue.put_nowait, item),
            request_id=request_id,
        )
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled = True  # a no-op when it finished; otherwise it leaves at the next step

    async def generate(
        self, request: GenerationRequest, params: SamplingParams | None = None, *, request_id: str = ""
    ) -> Completion:
        parts, last, logprobs = [], None, list[TokenLogprob]()
        async for delta in self.stream(request, params, request_id=request_id):
            parts.append(delta.text)
            logprobs += delta.logprobs
            last = delta
        assert last is not None and last.finish_reason is not None and last.timings is not None
        return Completion(
            "".join(parts),
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            last.batch_size,
            last.adapters_in_batch,
            last.timings,
            last.cached_tokens,
            tuple(logprobs),
        )

    async def classify(
        self, request: GenerationRequest, labels: Sequence[str], *, request_id: str = ""
    ) -> ClassifyResult:
        """Score ``labels`` as the answer to ``request`` (prefill only, batched with other rows)."""
        if not labels:
            raise EngineError("classify needs at least one label")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(item: Any) -> None:
            if not future.done():
                future.set_result(item)

        job = await self._submit(
            request,
            SamplingParams(),
            lambda item: _deliver(loop, settle, item),
            request_id=request_id,
            labels=labels,
        )
        try:
            result = await future
        finally:
            job.cancelled = True
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, ClassifyResult)
        return result

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    self._fail_all(QueueFull(f"{self.name}: shutting down"))
                    return
            try:
                self.iterate()
            except (
                Exception
            ) as e:  # a fault outside any one row: the running rows fail, the replica serves on
                logger.exception("%s: step failed; failing %d running rows", self.name, len(self._running))
                with self.engine.lock, self._cond:
                    for seq in list(self._running):
                        self._drop(seq, EngineError(f"generation failed: {e}"))

    def iterate(self) -> bool:
        """Plan and run one step; False when there was nothing to run."""
        engine = self.engine
        with engine.lock:
            with self._cond:
                plan = self._plan()
            if not plan:
                return False
            engine.grammars.prefetch([s.matcher for s, w in plan if w.logits and s.matcher is not None])
            results = self._forward(plan)
            with self._cond:
                self._finish(plan, results)
        return True

    def _fail_all(self, error: BaseException) -> None:
        with self.engine.lock:
            for seq in list(self._running):
                self._drop(seq, error)
            for job in self._waiting:
                job.sink(error)
            self._waiting.clear()

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
                self.prefills += 1
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


def run_batch(
    engine: Engine, requests: Sequence[GenerationRequest], params: Sequence[SamplingParams]
) -> list[Completion]:
    """Run ``requests`` to completion together, on the calling thread (all admitted at once where the
    KV cache allows). :meth:`Engine.generate <moe_core.engine.core.Engine.generate>`, the merge jobs'
    checks and the benchmarks use it."""
    out: list[Completion | BaseException | None] = [None] * len(requests)
    texts: list[list[str]] = [[] for _ in requests]
    logprobs: list[list[TokenLogprob]] = [[] for _ in requests]
    sched = Scheduler(engine, max_running=max(1, len(requests)), max_queued=len(requests), name=engine.name)

    def sink(i: int) -> Callable[[Any], None]:
        def put(item: Any) -> None:
            if isinstance(item, BaseException):
                out[i] = item
                return
            texts[i].append(item.text)
            logprobs[i] += item.logprobs
            if item.finish_reason is not None:
                out[i] = Completion(
                    "".join(texts[i]),
                    item.finish_reason,
                    item.prompt_tokens,
                    item.completion_tokens,
                    item.batch_size,
                    item.adapters_in_batch,
                    item.timings,
                    item.cached_tokens,
                    tuple(logprobs[i]),
                )

        return put

    for i, (r, p) in enumerate(zip(requests, params, strict=True)):
        sched.enqueue(r, p, sink(i), limit=False)  # not a served request: no serving limit
    while sched.iterate():
        pass
    results: list[Completion] = []
    for item in out:
        if isinstance(item, BaseException):
            raise item
        assert item is not None
        results.append(item)
    return results


def _deliver(loop: asyncio.AbstractEventLoop, put: Callable[[Any], None], item: Any) -> None:
    """Hand ``item`` to the event loop's side (from the scheduler's thread); a loop gone is ignored."""
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for this request any more
        loop.call_soon_threadsafe(put, item)
