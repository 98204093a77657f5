"""The GPU benchmark's workloads, run by the production step scheduler (:class:`Scheduler`).

A decode measurement at batch ``B`` is a trace: ``B`` screenshot requests arrive one step apart (each
joins while the earlier ones decode), all ``B`` decode together for ``hold`` steps, then they leave at
different steps (up to 8 leave times). The scheduler is stepped on this thread (:meth:`Scheduler.enqueue`
and :meth:`Scheduler.iterate`, the step its own loop thread runs), so each step is timed on its own,
with the device synchronised around it; a decode figure is the p50 of the steps that ran exactly ``B``
decoding rows and no prompt chunk. Time to first token goes through :meth:`Scheduler.stream`, the
serving path (prompt built off the loop, the loop thread, the first delta).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from moe_core.engine import Engine, GenerationRequest, SamplingParams, Scheduler

__all__ = ["Arrival", "Screens", "TraceResult", "run_trace", "staggered_trace", "ttft", "warm_up"]

#: The user's prompt of every benchmark request (an agent's instruction).
PROMPT = "Click the Save button in the toolbar and report the coordinates you clicked."


class Screens:
    """Screenshots of one size, each with different pixels (so neither the vision-feature cache nor the
    prefix cache, both keyed by content, serves one request's work to another, as with real screens)."""

    def __init__(self, size: tuple[int, int], seed: int = 0) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        self.base = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        self.count = 0

    def next(self) -> Image.Image:
        self.count += 1
        im = self.base.copy()
        c = self.count
        for x in range(4):  # a unique stamp in the top row
            im.putpixel((x, 0), (c & 255, (c >> 8) & 255, (c >> 16) & 255))
        return im


@dataclass(frozen=True)
class Arrival:
    """A request that joins before scheduler step ``step`` and leaves after ``tokens`` tokens."""

    step: int
    request: GenerationRequest
    tokens: int


def staggered_trace(screens: Screens, adapters: Sequence[str | None], batch: int, hold: int) -> list[Arrival]:
    """``batch`` rows arriving one step apart, row ``i`` on adapter ``adapters[i % len]``; every row decodes
    while the later ones join, all decode together for about ``hold`` steps, then they leave in groups."""
    group = max(1, batch // 8)
    return [
        Arrival(i, GenerationRequest(screens.next(), PROMPT, adapters[i % len(adapters)]), tokens)
        for i in range(batch)
        # row i's first token comes in step i and it decodes from step i + 1; the last row from step batch:
        # all rows decode together for `hold` steps (when each prompt is read in one step), then leave
        for tokens in [(batch - i) + hold + i // group]
    ]


@dataclass
class TraceResult:
    """Every step of a trace: seconds, decoding rows, prompt tokens read, KV pages in use before it."""

    steps: list[tuple[float, int, int, int]] = field(default_factory=list)
    joins: int = 0  # steps in which a prompt was read beside decoding rows (a request joining them)
    leaves: int = 0  # steps in which rows finished and left while others went on
    completions: int = 0

    def decode_steps(self, rows: int) -> list[tuple[float, int]]:
        """(seconds, KV pages) of the steps that ran exactly ``rows`` decoding rows and nothing else."""
        return [(dt, pages) for dt, d, p, pages in self.steps if d == rows and p == 0]


def _sink(done: list[Any]) -> Callable[[Any], None]:
    def put(item: Any) -> None:
        if isinstance(item, BaseException) or getattr(item, "finish_reason", None) is not None:
            done.append(item)

    return put


def run_trace(
    engine: Engine, trace: Sequence[Arrival], sync: Callable[[], None], max_steps: int
) -> TraceResult:
    """Run ``trace`` through a fresh scheduler, one timed step at a time; raise on any failed request."""
    sched = Scheduler(engine, max_running=len(trace), max_queued=len(trace), name=f"{engine.name}-bench")
    pending = sorted(trace, key=lambda a: a.step)
    done: list[Any] = []
    out = TraceResult()
    k = 0
    try:
        while len(out.steps) < max_steps:
            while pending and pending[0].step <= k:
                a = pending.pop(0)
                params = SamplingParams(max_tokens=a.tokens, min_tokens=a.tokens)
                sched.enqueue(a.request, params, _sink(done), request_id=f"r{a.step}")
            pages = sched.stats()["kv_pages_used"]
            finished = len(done)
            sync()
            t0 = time.perf_counter()
            ran = sched.iterate()
            sync()
            dt = time.perf_counter() - t0
            if not ran:
                if not pending:
                    break
                k = pending[0].step
                continue
            record = sched.history[-1]
            prompt = sum(n for _, n in record.prefill)
            out.steps.append((dt, len(record.decode), prompt, pages))
            out.joins += bool(record.decode and record.prefill)
            out.leaves += len(done) > finished and sched.running > 0
            k += 1
    finally:
        sched.close()
    errors = [d for d in done if isinstance(d, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} benchmark requests failed: {errors[0]}") from errors[0]
    if pending or len(done) < len(trace):
        raise RuntimeError(f"trace of {len(trace)} requests did not finish in {max_steps} steps")
    out.completions = len(done)
    return out


def warm_up(engine: Engine, adapters: Sequence[str | None], batch: int, sync: Callable[[], None]) -> None:
    """``batch`` short text-only rows for a few steps: the decode step at this batch size and composition
    runs once (kernels chosen, a CUDA graph captured where the engine captures one) before it is timed."""
    trace = [
        Arrival(0, GenerationRequest(None, f"warm up {i}", adapters[i % len(adapters)]), 4)
        for i in range(batch)
    ]
    run_trace(engine, trace, sync, max_steps=64)


def ttft(engine: Engine, requests: Sequence[GenerationRequest]) -> list[tuple[float, float]]:
    """Time to first token of each request alone on the engine, through :meth:`Scheduler.stream`: (seconds
    the client waited for its first token, the engine's own ``ttft_s`` from submission)."""
    sched = Scheduler(engine, max_running=1, max_queued=1, name=f"{engine.name}-ttft")

    async def one(request: GenerationRequest) -> tuple[float, float]:
        t0 = time.perf_counter()
        async for delta in sched.stream(request, SamplingParams(max_tokens=1, min_tokens=1)):
            if delta.finish_reason is not None and delta.timings is not None:
                return time.perf_counter() - t0, delta.timings.ttft_s
        raise RuntimeError("stream ended without a finish")

    try:
        return [asyncio.run(one(r)) for r in requests]
    finally:
        sched.close()
