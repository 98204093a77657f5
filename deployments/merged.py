"""One merged-model deployment class, bound once per merged adapter by the app builder.

Each replica loads the current published version from ``merged/<name>/`` and answers through the
engine's continuous-batching scheduler (``generate``, or ``stream`` as a Ray Serve streaming method);
a newer published version is picked up without a restart. With nothing
published it stays up and answers :class:`ModelUnavailable`, so the gateway can fall back.
"""

from __future__ import annotations

import asyncio
import json
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
        self._task: asyncio.Task[None] | None = None
        self.source: dict[str, Any] = {}  # the served version's merge metadata
        self.stale: str | None = None  # why the served version no longer matches the published adapter
        self._load(self.storage.current_version("merged", self.adapter))

    def _load(self, version: str | None) -> None:
        if version is None:
            logger.warning("merged %s: no published version; requests fall back", self.adapter)
            return
        t0 = time.perf_counter()
        path, _ = self.storage.fetch("merged", self.adapter, version)  # verified against its manifest
        try:
            meta = json.loads((path / "merge_metadata.json").read_text())
        except (OSError, ValueError):
            meta = {}
        engine = self.make_engine(path, f"merged-{self.adapter}")
        old, self.engine = self.engine, engine
        close = getattr(getattr(old, "scheduler", None), "close", None)
        if close is not None:  # the old version's running rows finish; its thread ends when idle
            close_when_idle(old, close)
        self.metrics.serving(self.adapter, version, self.version, time.perf_counter() - t0)
        self.version, self.source = version, meta
        self._check_source()
        logger.info(
            "merged %s: serving version %s (loaded in %.2fs)", self.adapter, version, time.perf_counter() - t0
        )

    def _check_source(self) -> None:
        """Stale when the merged model was built from another adapter version than the one now
        published (or from another base model): dynamic answers then, so the two never disagree."""
        from moe_core.modeling import base_model_id

        meta, stale = self.source, None
        base = base_model_id(self.settings.engine.base_model)
        if meta.get("base_model") not in (None, base):
            stale = f"merged from base {meta.get('base_model')}, not {base}"
        else:
            merged_from = meta.get("source_version")
            current = self.storage.current_version("expert", self.adapter)
            if merged_from is not None and current is not None and merged_from != current:
                stale = f"merged from adapter version {merged_from}; {current} is published"
        if stale != self.stale:
            (logger.warning if stale else logger.info)(
                "merged %s: %s",
                self.adapter,
                f"stale ({stale}): requests fall back" if stale else "up to date",
            )
        self.stale = stale

    async def _refresh(self) -> None:
        """Look for a new version now and then, in the background: requests never wait for a load."""
        if time.monotonic() - self._checked < self.settings.batching.refresh_interval_s:
            return
        if self._swap.locked():
            return
        self._checked = time.monotonic()
        self._task = asyncio.create_task(self._check())

    async def _check(self) -> None:
        async with self._swap:
            try:
                current = await asyncio.to_thread(self.storage.current_version, "merged", self.adapter)
                if current is not None and current != self.version:
                    await asyncio.to_thread(self._load, current)
                elif self.engine is not None:
                    await asyncio.to_thread(self._check_source)
            except Exception as e:  # storage unreadable or a version that fails to verify: keep serving
                logger.error(
                    "merged %s: refresh failed (%s); still serving %s", self.adapter, e, self.version
                )

    async def _prepare(
        self, query: Query
    ) -> tuple[DeploymentEngine, str | None, GenerationRequest, SamplingParams]:
        await self._refresh()
        engine, version = self.engine, self.version
        if self.stale is not None:
            raise ModelUnavailable(f"merged deployment {self.adapter!r} is stale: {self.stale}")
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
        return MergedStatus(self.adapter, self.version, self.engine is not None and self.stale is None)

    def check_health(self) -> None:
        """Unhealthy when the engine cannot run (its device fails, its scheduler thread died); a replica
        with nothing published is healthy (it answers ModelUnavailable and the gateway falls back)."""
        if self.engine is not None:
            self.engine.check_health()


def close_when_idle(engine: Any, close: Any) -> None:
    """Close a replaced engine's scheduler once its queued and running requests are done."""

    def wait() -> None:
        sched = engine.scheduler
        while sched.queued or sched.running:
            time.sleep(0.05)
        close()

    threading.Thread(target=wait, name="close-old-engine", daemon=True).start()
