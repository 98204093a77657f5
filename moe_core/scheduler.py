"""Step-level scheduling (continuous batching) of one engine: requests join and leave a running batch.

One :class:`Scheduler` per model replica runs a loop on its own thread. At every decode-step boundary
it admits waiting requests (up to ``max_running`` rows in flight), reads their prompts in one prefill
forward and joins them to the running batch; then one decode step advances every running row by one
token, each with its own adapter (LoRA slots), sampling settings and stop strings. A finished row
leaves at once; a short request that arrives while a long one decodes starts at the next step instead
of waiting for the whole batch (as Orca and vLLM do). A full queue is refused at once
(:class:`QueueFull`), never left to hang.

Every request is validated on its own before it joins (valid unicode, its prompt within the token
limit); a prefill that fails is retried row by row, so one bad row fails only itself. Classification
(the routing adapter) runs through the same loop as a prefill-only row.

The loop is driven from asyncio: :meth:`Scheduler.stream` is an async iterator of :class:`Delta` per
request (the new text as it is decoded), :meth:`Scheduler.generate` its collected result. Each final
delta carries the request's :class:`Timings` (queue time, time to first token, time per output token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_core.engine import ClassifyResult, Engine, EngineError, GenerationRequest, KVBatch
from moe_core.sampling import FinishReason, SamplingParams, TextStream, make_generator, next_tokens

__all__ = ["Completion", "Delta", "PromptTooLong", "QueueFull", "Scheduler", "Timings", "run_batch"]

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The replica's queue is full: the request is refused at once (a 503 with a retry hint)."""


class PromptTooLong(EngineError):
    """A prompt over the engine's token limit (its images' tokens and the chat template included)."""


@dataclass(frozen=True)
class Timings:
    """Where one request's time went, measured in the replica (seconds)."""

    queued_s: float  # submitted -> its prefill started
    ttft_s: float  # submitted -> first token
    total_s: float  # submitted -> last token
    tpot_s: float  # time per output token after the first (0 with one token)


@dataclass(frozen=True)
class Delta:
    """New text of one request; the last delta has ``finish_reason`` and the timings."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0  # rows in the step that produced it
    adapters_in_batch: int = 0
    timings: Timings | None = None


@dataclass(frozen=True)
class Completion:
    """A whole answer (the deltas of :meth:`Scheduler.stream` joined)."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    batch_size: int  # most rows in a step while it ran
    adapters_in_batch: int
    timings: Timings


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    params: SamplingParams
    sink: Callable[[Delta | BaseException | ClassifyResult], None]
    request_id: str = ""
    labels: tuple[str, ...] = ()  # a classification: score these as the answer's first token
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first: float = 0.0
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    job: _Job
    text: TextStream
    generator: torch.Generator | None
    prompt_tokens: int
    tokens: int = 0
    last: int = 0
    most_rows: int = 0
    most_adapters: int = 0


class Scheduler:
    """Continuous batching over one :class:`~moe_core.engine.Engine` (its own thread)."""

    def __init__(
        self, engine: Engine, *, max_running: int = 16, max_queued: int = 64, name: str = ""
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"need max_running >= 1 and max_queued >= 0, got {max_running}, {max_queued}")
        self.engine = engine
        self.max_running, self.max_queued = max_running, max_queued
        self.name = name or engine.name
        self._waiting: deque[_Job] = deque()
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._admitting = 0  # jobs taken off the queue whose prefill runs now
        self._admitted: list[_Job] = []  # those jobs: their adapters are in use too
        self._eos = set(engine.eos_token_ids)
        self.steps = 0  # decode steps run
        self.prefills = 0
        self.rows_per_step: dict[int, int] = {}  # rows in a decode step -> steps

    # ------------------------------------------------------------------ state
    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def in_use(self) -> set[str]:
        """Adapters of queued and running requests: their slots must not change under them."""
        with self._cond:
            jobs = [r.job for r in self._rows] + list(self._waiting) + self._admitted
        return {j.request.adapter for j in jobs if j.request.adapter is not None}

    def healthy(self) -> bool:
        """The loop thread runs (or has not been needed yet) and the scheduler is not closed."""
        return not self._closed and (self._thread is None or self._thread.is_alive())

    def resize(self, max_running: int, max_queued: int) -> None:
        with self._cond:
            self.max_running, self.max_queued = max_running, max_queued
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # -------------------------------------------------------------- requests
    def submit(
        self,
        request: GenerationRequest,
        params: SamplingParams,
        sink: Callable[[Any], None],
        *,
        request_id: str = "",
        labels: Sequence[str] = (),
    ) -> _Job:
        """Queue one request; ``sink`` gets its deltas (from the scheduler's thread). Raises at once for
        a request that cannot run (:class:`QueueFull`, :class:`PromptTooLong`, ``UnicodeEncodeError``)."""
        self.check(request)
        job = _Job(request, params, sink, request_id, tuple(labels))
        with self._cond:
            if self._closed:
                raise QueueFull(f"{self.name}: shutting down")
            running = len(self._rows) + self._admitting
            if len(self._waiting) >= self.max_queued + max(0, self.max_running - running):
                raise QueueFull(
                    f"{self.name}: {len(self._waiting)} requests queued and {running} running, the most "
                    "this replica takes; retry later"
                )
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"scheduler-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return job

    def check(self, request: GenerationRequest) -> None:
        """The request on its own: valid unicode, its prompt within the engine's token limit."""
        engine = self.engine
        tokens = sum(engine.image_tokens(im, request.bounds) for im in request.images)
        n = engine.prompt_tokens(request.prompt, tokens, turns=request.turns)  # UnicodeEncodeError here
        limit = engine.settings.max_prompt_tokens
        if n > limit:
            raise PromptTooLong(
                f"the prompt is {n} tokens ({tokens} image tokens), over the limit of {limit}"
            )

    async def stream(
        self, request: GenerationRequest, params: SamplingParams | None = None, *, request_id: str = ""
    ) -> AsyncIterator[Delta]:
        """The request's new text as it is decoded; the last delta has the finish reason and usage.
        Leaving the iteration early (a client gone) cancels the request at the next step."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = self.submit(
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
        parts, last = [], None
        async for delta in self.stream(request, params, request_id=request_id):
            parts.append(delta.text)
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
        )

    async def classify(
        self, request: GenerationRequest, labels: Sequence[str], *, request_id: str = ""
    ) -> ClassifyResult:
        """Score ``labels`` as the answer to ``request`` (prefill only, batched with other rows)."""
        if not labels:
            raise EngineError("classify needs at least one label")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def settle(item: Any) -> None:
            if not future.done():
                future.set_result(item)

        def sink(item: Any) -> None:
            _deliver(loop, settle, item)

        job = self.submit(request, SamplingParams(), sink, request_id=request_id, labels=labels)
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
                while not self._closed and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._closed:
                    self._fail_all(QueueFull(f"{self.name}: shutting down"))
                    return
                room = self.max_running - len(self._rows)
                admitted: list[_Job] = []
                while self._waiting and len(admitted) < room:
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        admitted.append(job)
                self._admitting, self._admitted = len(admitted), admitted
            try:
                if admitted:
                    self._admit(admitted)
                with self._cond:
                    self._admitting, self._admitted = 0, []
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as e:  # an engine fault: the running rows fail, the replica keeps serving
                logger.exception("%s: step failed; failing %d running rows", self.name, len(self._rows))
                rows, self._rows, self._batch = self._rows, [], None
                for row in rows:
                    row.job.sink(EngineError(f"generation failed: {e}"))

    def _fail_all(self, error: BaseException) -> None:
        for job in [r.job for r in self._rows] + list(self._waiting):
            job.sink(error)
        self._rows, self._waiting, self._batch = [], deque(), None

    def _admit(self, jobs: list[_Job]) -> None:
        """Prefill the new rows (one forward; row by row when it fails) and join them to the batch."""
        now = time.perf_counter()
        for job in jobs:
            job.started = now
        try:
            logits, batch = self.engine.prefill([j.request for j in jobs])
            self.prefills += 1
            results: list[tuple[_Job, torch.Tensor, KVBatch, int]] = [
                (j, logits[i], batch, i) for i, j in enumerate(jobs)
            ]
            self._take(results, batch)
        except Exception as e:
            if len(jobs) == 1:
                logger.warning("%s: %s: request failed in prefill: %s", self.name, jobs[0].request_id, e)
                jobs[0].sink(e if isinstance(e, EngineError | ValueError) else EngineError(str(e)))
                return
            for job in jobs:  # find the bad row: the others run as if it had never come
                self._admit([job])

    def _take(self, results: list[tuple[_Job, torch.Tensor, KVBatch, int]], batch: KVBatch) -> None:
        keep: list[int] = []
        new_rows: list[_Row] = []
        gen_logits: list[torch.Tensor] = []
        for job, logits, _, i in results:
            if job.labels:
                job.sink(self._score(job, logits))
                continue
            row = _Row(
                job,
                TextStream(self.engine.processor.tokenizer, job.params.stop),
                make_generator(job.params, logits.device),
                batch.prompt_tokens[i],
            )
            keep.append(i)
            new_rows.append(row)
            gen_logits.append(logits)
        if not new_rows:
            return
        if len(keep) < len(batch):
            batch.select(keep)
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.join(batch)
        self._rows += new_rows
        self._advance(new_rows, torch.stack(gen_logits))

    def _score(self, job: _Job, logits: torch.Tensor) -> ClassifyResult | BaseException:
        tok = self.engine.processor.tokenizer
        firsts = [tok.encode(label, add_special_tokens=False)[0] for label in job.labels]
        if len(set(firsts)) < len(firsts):  # labels share a first token: score whole label sequences
            r = job.request
            try:
                image = r.images[-1] if r.images else None
                if image is None:
                    raise EngineError("classifying by label sequences needs an image")
                return self.engine.classify(
                    image, r.prompt, job.labels, r.adapter, system_prompt="", bounds=r.bounds
                )
            except Exception as e:
                return e
        scores = torch.log_softmax(logits, -1)[firsts]
        probs = torch.softmax(scores, -1).tolist()
        best = max(range(len(job.labels)), key=lambda i: probs[i])
        return ClassifyResult(job.labels[best], probs[best], dict(zip(job.labels, probs, strict=True)))

    def _drop_cancelled(self) -> None:
        gone = [k for k, r in enumerate(self._rows) if r.job.cancelled]
        if gone:
            self._remove(gone)

    def _step(self) -> None:
        assert self._batch is not None
        self.steps += 1
        n = len(self._rows)
        self.rows_per_step[n] = self.rows_per_step.get(n, 0) + 1
        logits = self.engine.decode(self._batch, [r.last for r in self._rows])
        self._advance(self._rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token, send its new text, and let finished rows leave."""
        blocked = [list(self._eos) if r.tokens < r.job.params.min_tokens else [] for r in rows]
        tokens = next_tokens(logits, [r.job.params for r in rows], [r.generator for r in rows], blocked)
        now = time.perf_counter()
        n_rows = len(self._rows)
        n_adapters = len({r.job.request.adapter for r in self._rows})
        done: set[int] = set()
        for row, token in zip(rows, tokens, strict=True):
            row.tokens += 1
            row.last = token
            row.most_rows, row.most_adapters = max(row.most_rows, n_rows), max(row.most_adapters, n_adapters)
            job = row.job
            if row.tokens == 1:
                job.first = now
            limit = job.params.max_tokens or self.engine.max_new_tokens
            finish: FinishReason | None = None
            text = ""
            if token in self._eos:
                finish = "stop"
            else:
                text = row.text.add(token)
                if row.text.stopped:
                    finish = "stop"
            if finish is None and row.tokens >= limit:
                finish = "length"
            if finish is not None:
                text += row.text.flush()
                done.add(id(row))
            timings = None
            if finish is not None:
                tpot = (now - job.first) / (row.tokens - 1) if row.tokens > 1 else 0.0
                timings = Timings(job.started - job.arrived, job.first - job.arrived, now - job.arrived, tpot)
            if text or finish is not None:
                job.sink(
                    Delta(
                        text, finish, row.prompt_tokens, row.tokens, row.most_rows, row.most_adapters, timings
                    )
                )
        if done:
            self._remove([k for k, r in enumerate(self._rows) if id(r) in done])

    def _remove(self, indexes: list[int]) -> None:
        gone = set(indexes)
        keep = [k for k in range(len(self._rows)) if k not in gone]
        self._rows = [self._rows[k] for k in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(keep)


def run_batch(
    engine: Engine, requests: Sequence[GenerationRequest], params: Sequence[SamplingParams]
) -> list[Completion]:
    """Run ``requests`` to completion as one batch, on the calling thread (no joins: a static batch).
    The engine's :meth:`~moe_core.engine.Engine.generate` and the merge jobs' checks use it."""
    out: list[Completion | BaseException | None] = [None] * len(requests)
    texts: list[list[str]] = [[] for _ in requests]
    sched = Scheduler(engine, max_running=max(1, len(requests)), max_queued=len(requests), name=engine.name)

    def sink(i: int) -> Callable[[Any], None]:
        def put(item: Any) -> None:
            if isinstance(item, BaseException):
                out[i] = item
                return
            texts[i].append(item.text)
            if item.finish_reason is not None:
                out[i] = Completion(
                    "".join(texts[i]),
                    item.finish_reason,
                    item.prompt_tokens,
                    item.completion_tokens,
                    item.batch_size,
                    item.adapters_in_batch,
                    item.timings,
                )

        return put

    jobs = [_Job(r, p, sink(i)) for i, (r, p) in enumerate(zip(requests, params, strict=True))]
    sched._admit(jobs)
    while sched._rows:
        sched._step()
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
