"""One merged-model deployment class, bound once per merged adapter by the app builder.

Each replica loads the current published version from ``merged/<name>/`` and answers with plain
(single-model) batches; a newer published version is picked up without a restart. With nothing
published it stays up and answers :class:`ModelUnavailable`, so the gateway can fall back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from PIL import Image
from ray import serve

from deployments.engines import DeploymentEngine, ModelDeployment
from deployments.messages import Answer, MergedStatus, Query
from deployments.observability import MergedMetrics
from deployments.schemas import open_image
from deployments.settings import MergedSettings
from moe_core.engine import GenerationRequest

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
        self.engine = self.engine_factory(self.settings.engine, path, f"merged-{self.adapter}")
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

    async def generate(self, query: Query) -> Answer:
        await self._refresh()
        if self.engine is None:
            raise ModelUnavailable(f"merged deployment {self.adapter!r} has no published model")
        self.check_prompt(self.engine, query)  # before the batch: a refused row never joins one
        item = (open_image(query.image), query, time.perf_counter())  # decoded before batching
        result: Answer = await self._batched(item)
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[tuple[Image.Image, Query, float]]) -> list[Answer]:
        engine, version = self.engine, self.version
        assert engine is not None
        reqs = [GenerationRequest(img, q.prompt, None, bounds=q.bounds) for img, q, _ in items]
        started = time.perf_counter()
        results = await asyncio.to_thread(engine.generate, reqs)
        self.metrics.forward(
            "merged",
            [(q.request_id, self.adapter, t) for _, q, t in items],
            started,
            [r.num_tokens for r in results],
        )
        return [
            Answer(r.text, self.adapter, "merged", version, r.batch_size, 1, r.prompt_tokens, r.num_tokens)
            for r in results
        ]

    def status(self) -> MergedStatus:
        return MergedStatus(self.adapter, self.version, self.engine is not None)
