"""Step scheduling (continuous batching) over the paged KV cache: the bounded queue, the loop thread and
the asyncio API.

One :class:`Scheduler` per model replica runs a loop on its own thread. Each step it plans one packed
forward, runs it and advances every row: decoding rows first, then prompt chunks, then newly admitted
requests while their pages fit, preempting the youngest row when the KV cache is full (its base,
:class:`~moe_core.engine.planner.StepPlanner`, says how). A full queue is refused at once
(:class:`QueueFull`). Prompts are built (template, tokenization, image resize and patches) on the
caller's side, outside the engine's lock. Classification (the routing adapter) runs through the same loop
as a prefill-only row.

:meth:`Scheduler.stream` is an async iterator of :class:`Delta` per request, :meth:`Scheduler.generate`
its collected result; :func:`run_batch` runs a list of requests to completion on the calling thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from moe_core.engine.constraints import Grammar
from moe_core.engine.planner import StepPlanner, StepRecord
from moe_core.engine.prompts import Prompt
from moe_core.engine.request import (
    Classification,
    Completion,
    Delta,
    EngineError,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
)
from moe_core.engine.sampling import SamplingParams, TokenLogprob
from moe_core.engine.sequence import Job

if TYPE_CHECKING:
    from moe_core.engine.core import Engine

__all__ = ["Scheduler", "StepRecord", "run_batch"]

logger = logging.getLogger(__name__)


class Scheduler(StepPlanner):
    """Continuous batching over one :class:`~moe_core.engine.core.Engine` (its own thread)."""

    def __init__(
        self, engine: Engine, *, max_running: int = 16, max_queued: int = 64, name: str = ""
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"need max_running >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        super().__init__(engine, max_running=max_running, name=name)
        self.max_queued = max_queued
        self._pending: list[GenerationRequest] = []  # submitted, prompt being built off the event loop
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

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
        most = self.engine.settings.limits.max_prompt_tokens
        image_tokens = sum(im.tokens for im in prompt.images)
        # The serving limit on the whole prompt, checked once per request, here: the prompt as tokenized
        # (a deployment reports the refusal as a 413 naming the prompt). The gateway checks the images'
        # tokens alone, before any replica (deployments.gateway.pipeline.check_image_tokens).
        if limit and len(prompt) > most:
            raise PromptTooLong(
                f"the prompt is {len(prompt)} tokens ({image_tokens} image tokens), over the limit of {most}; "
                "shorten the prompt or send a lower max_pixels"
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
        grammar = self._grammar(params)
        vision = engine.vision_identity(request.adapter)
        engine.prompts.make_pixels([im for im in prompt.images if (im.key, vision) not in engine.features])
        return prompt, grammar

    def _grammar(self, params: SamplingParams) -> Grammar | None:
        """The answer's grammar when ``params`` constrain it (compiled, or from the engine's cache)."""
        return self.engine.grammars.compile(params.constraint) if params.constraint is not None else None

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

    # same shape as submit()'s parameters, a different way in (no loop thread, no room check): not a duplicate
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
        grammar = self._grammar(params)
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
    ) -> Classification:
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
        assert isinstance(result, Classification)
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
