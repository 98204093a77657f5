"""One merged-model deployment class, bound once per merged adapter by the app builder.

Each replica loads the current published version from ``merged/<name>/`` and answers through the
engine's continuous-batching scheduler (``generate``, or ``stream`` as a Ray Serve streaming method);
a newer published version is picked up without a restart. With nothing
published it stays up and answers :class:`ModelUnavailable`, so the gateway can fall back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.engines import DeploymentEngine, ModelDeployment
from deployments.messages import Answer, Chunk, MergedStatus, Query
from deployments.observability import MergedMetrics
from deployments.settings import MergedSettings
from moe_core.engine import GenerationRequest
from moe_core.sampling import SamplingParams

__all__ = ["MergedModel", "ModelUnavailable"]

logger = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """This merged deployment has no published model to serve."""


class MergedModel(ModelDeployment[MergedSettings]):
    def _start(self) -> None:
        self.adapter = self.settings.adapter
        self.metrics = MergedMetrics()
        self.engine: DeploymentEngine | None = None
        self.version: str | None = None
        self._checked = 0.0
        self._swap = asyncio.Lock()
        self._load(self.storage.current_version("merged", self.adapter))

    def _load(self, version: str | None) -> None:
        if version is None:
            logger.warning("merged %s: no published version; requests fall back", self.adapter)
            return
        t0 = time.perf_counter()
        path, _ = self.storage.fetch("merged", self.adapter, version)
        old = self.engine
        self.engine = self.make_engine(path, f"merged-{self.adapter}")
        close = getattr(getattr(old, "scheduler", None), "close", None)
        if close is not None:  # the old version's running rows finish; its thread ends when idle
            close_when_idle(old, close)
        self.metrics.serving(self.adapter, version, self.version, time.perf_counter() - t0)
        self.version = version
        logger.info(
            "merged %s: serving version %s (loaded in %.2fs)", self.adapter, version, time.perf_counter() - t0
        )

    async def _refresh(self) -> None:
        if time.monotonic() - self._checked < self.settings.batching.refresh_interval_s:
            return
        async with self._swap:
            self._checked = time.monotonic()
            current = await asyncio.to_thread(self.storage.current_version, "merged", self.adapter)
            if current is not None and current != self.version:
                await asyncio.to_thread(self._load, current)

    async def _prepare(
        self, query: Query
    ) -> tuple[DeploymentEngine, str | None, GenerationRequest, SamplingParams]:
        await self._refresh()
        engine, version = self.engine, self.version
        if engine is None:
            raise ModelUnavailable(f"merged deployment {self.adapter!r} has no published model")
        self.check_prompt(engine, query)  # before the batch: a refused row never joins one
        request, params = self.request(query, None)
        return engine, version, request, params

    async def generate(self, query: Query) -> Answer:
        engine, version, request, params = await self._prepare(query)
        done = await engine.generate(request, params, request_id=query.request_id)
        self.metrics.finished(
            "merged", self.adapter, query.request_id, done.timings, done.prompt_tokens, done.completion_tokens
        )
        return Answer(
            done.text,
            self.adapter,
            "merged",
            version,
            done.batch_size,
            1,
            done.prompt_tokens,
            done.completion_tokens,
            done.finish_reason,
            done.timings.ttft_s,
        )

    async def stream(self, query: Query) -> AsyncIterator[Chunk]:
        """The answer as it is decoded (Ray Serve streaming: ``handle.options(stream=True)``)."""
        engine, version, request, params = await self._prepare(query)
        async for d in engine.stream(request, params, request_id=query.request_id):
            if d.timings is not None:
                self.metrics.finished(
                    "merged", self.adapter, query.request_id, d.timings, d.prompt_tokens, d.completion_tokens
                )
            yield Chunk(
                d.text, self.adapter, "merged", version, d.finish_reason, d.prompt_tokens, d.completion_tokens
            )

    def status(self) -> MergedStatus:
        return MergedStatus(self.adapter, self.version, self.engine is not None)


def close_when_idle(engine: Any, close: Any) -> None:
    """Close a replaced engine's scheduler once its queued and running requests are done."""

    def wait() -> None:
        sched = engine.scheduler
        while sched.queued or sched.running:
            time.sleep(0.05)
        close()

    threading.Thread(target=wait, name="close-old-engine", daemon=True).start()
