"""One merged-model deployment class, bound once per merged adapter by the app builder.

Each replica loads the current published version from ``merged/<name>/`` and answers with plain
(single-model) batches; a newer published version is picked up without a restart. With nothing
published it stays up and answers :class:`ModelUnavailable`, so the router can fall back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from PIL import Image
from ray import serve

from deployments.schemas import open_image
from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest
from moe_core.storage import Storage

__all__ = ["MergedModel", "ModelUnavailable"]

logger = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """This merged deployment has no published model to serve."""


class MergedModel:
    def __init__(self, adapter: str, config: dict[str, Any]) -> None:
        self.cfg = DeploymentConfig.from_static(config)
        self.adapter = adapter
        self.storage = Storage(self.cfg.storage.url, self.cfg.storage.cache_dir)
        self.engine: Engine | None = None
        self.version: str | None = None
        self._checked = 0.0
        self._swap = asyncio.Lock()
        self._batched.set_batch_wait_timeout_s(self.cfg.dynamic.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._batched.set_max_batch_size(self.cfg.limits.max_batch_size)  # type: ignore[attr-defined]
        self._load(self.storage.current_version("merged", adapter))

    def _load(self, version: str | None) -> None:
        if version is None:
            logger.warning("merged %s: no published version; requests fall back", self.adapter)
            return
        t0 = time.perf_counter()
        path, _ = self.storage.fetch("merged", self.adapter, version)
        self.engine = Engine.from_config(self.cfg, path, name=f"merged-{self.adapter}")
        self.version = version
        logger.info(
            "merged %s: serving version %s (loaded in %.2fs)", self.adapter, version, time.perf_counter() - t0
        )

    async def _refresh(self) -> None:
        if time.monotonic() - self._checked < self.cfg.dynamic.refresh_interval_s:
            return
        async with self._swap:
            self._checked = time.monotonic()
            current = await asyncio.to_thread(self.storage.current_version, "merged", self.adapter)
            if current is not None and current != self.version:
                await asyncio.to_thread(self._load, current)

    async def generate(self, image: bytes, prompt: str) -> dict[str, Any]:
        await self._refresh()
        if self.engine is None:
            raise ModelUnavailable(f"merged deployment {self.adapter!r} has no published model")
        result: dict[str, Any] = await self._batched((open_image(image), prompt))  # decoded before batching
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[tuple[Image.Image, str]]) -> list[dict[str, Any]]:
        engine, version = self.engine, self.version
        assert engine is not None
        reqs = [GenerationRequest(img, prompt, None) for img, prompt in items]
        results = await asyncio.to_thread(engine.generate, reqs)
        return [
            {
                "text": r.text,
                "adapter": self.adapter,
                "mode": "merged",
                "version": version,
                "batch_size": r.batch_size,
                "adapters_in_batch": 1,
            }
            for r in results
        ]

    def status(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "version": self.version, "ready": self.engine is not None}
