"""The shared dynamic-LoRA deployment: the base model once, adapters from storage in an LRU, and
concurrent requests for different adapters batched into one forward.

``@serve.batch`` is used without ``@serve.multiplexed`` (which would split batches by model id), so a
batch holds rows for any adapters and the engine runs them in one mixed-adapter ``generate``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image
from ray import serve

from deployments.adapter_cache import AdapterCache, AdapterNotFound
from deployments.schemas import open_image
from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest
from moe_core.storage import Storage

__all__ = ["AdapterNotServed", "DynamicLoRA", "RoutingUnavailable"]

logger = logging.getLogger(__name__)


class AdapterNotServed(LookupError):
    """The adapter is not in this deployment's list or has no published version."""


class RoutingUnavailable(RuntimeError):
    """No routing adapter is published."""


@dataclass(frozen=True)
class _Item:
    image: Image.Image  # decoded once per request, before batching
    prompt: str
    adapter: str | None


class DynamicLoRA:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = DeploymentConfig.from_static(config)
        self.cfg = cfg
        self.storage = Storage(cfg.storage.url, cfg.storage.cache_dir)
        self.engine = Engine.from_config(cfg, name="dynamic")
        self.cache = AdapterCache(self.engine, self.storage, cfg.dynamic.max_loaded_adapters,
                                  cfg.dynamic.refresh_interval_s)  # fmt: skip
        self.served: set[str] = set(cfg.all_adapters)
        self.router_cache: AdapterCache | None = None
        if cfg.router.adapter:
            self.router_cache = AdapterCache(
                self.engine, self.storage, 1, cfg.dynamic.refresh_interval_s, kind="routing"
            )
        self.batches: Counter[int] = Counter()  # batch size -> forwards
        self.mixed: Counter[int] = Counter()  # distinct adapters in one forward -> forwards
        self._configure(cfg.limits.max_batch_size, cfg.dynamic.batch_wait_timeout_s)

    # --------------------------------------------------------------- config
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings from `serve deploy`: the adapter list, the LRU size, batching."""
        adapters = user_config.get("adapters")
        if adapters is not None:
            merged = {a.name for a in self.cfg.merged.adapters}
            self.served = set(adapters) | merged
            for name in [n for n in self.cache.resident if n not in self.served]:
                self.cache.forget(name)
        if "max_loaded_adapters" in user_config:
            self.cache.resize(int(user_config["max_loaded_adapters"]))
        self._configure(
            int(user_config.get("max_batch_size", self.max_batch_size)),
            float(user_config.get("batch_wait_timeout_s", self.batch_wait_timeout_s)),
        )
        logger.info(
            "dynamic: reconfigured: adapters %s, LRU %d", sorted(self.served), self.cache.capacity,
        )  # fmt: skip

    def _configure(self, max_batch_size: int, wait_s: float) -> None:
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, wait_s
        self._batched.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._batched.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]

    # ------------------------------------------------------------ requests
    async def generate(self, image: bytes, prompt: str, adapter: str | None) -> dict[str, Any]:
        return await self._submit(open_image(image), prompt, adapter)

    async def _submit(self, image: Image.Image, prompt: str, adapter: str | None) -> dict[str, Any]:
        if adapter is not None and adapter not in self.served:
            raise AdapterNotServed(f"adapter {adapter!r} is not served by the dynamic deployment")
        result: dict[str, Any] | BaseException = await self._batched(_Item(image, prompt, adapter))
        if isinstance(result, BaseException):  # per-row failures come back as values
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[_Item]) -> list[dict[str, Any] | BaseException]:
        """One forward per group of at most LRU-capacity adapters (usually the whole batch)."""
        out: list[dict[str, Any] | BaseException] = [RuntimeError("row not run")] * len(items)
        adapters = sorted({i.adapter for i in items if i.adapter is not None})
        base_rows = [k for k, i in enumerate(items) if i.adapter is None]
        for n, group in enumerate(_chunks(adapters, self.cache.capacity)):
            versions, missing = await self._ensure(group)
            for k, item in enumerate(items):
                if item.adapter in missing:
                    out[k] = AdapterNotServed(missing[item.adapter])
            rows = [k for k, i in enumerate(items) if i.adapter in versions] + (base_rows if n == 0 else [])
            await self._run(rows, items, out, versions)
        return out

    async def _ensure(self, group: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Load ``group``; adapters that have no published version are reported, not fatal."""
        missing: dict[str, str] = {}
        while True:
            todo = [a for a in group if a not in missing]
            try:
                return await self.cache.ensure(todo), missing
            except AdapterNotFound as e:
                missing[e.name] = str(e)

    async def _run(
        self, rows: list[int], items: list[_Item], out: list[Any], versions: dict[str, str]
    ) -> None:
        if not rows:
            return
        reqs = [GenerationRequest(items[i].image, items[i].prompt, items[i].adapter) for i in rows]
        results = await asyncio.to_thread(self.engine.generate, reqs)
        n_adapters = len({items[i].adapter for i in rows})
        self.batches[len(rows)] += 1
        self.mixed[n_adapters] += 1
        for i, r in zip(rows, results, strict=True):
            out[i] = {
                "text": r.text,
                "adapter": r.adapter,
                "mode": "dynamic",
                "version": versions.get(r.adapter or ""),
                "batch_size": r.batch_size,
                "adapters_in_batch": r.adapters_in_batch,
            }

    async def route(
        self,
        image: bytes,
        prompt: str,
        labels: list[str],
        threshold: float,
        below_threshold: str,
        answer_here: list[str],
    ) -> dict[str, Any]:
        """Classify with the routing adapter (one forward); generate here when the adapter is in ``answer_here``.

        Returns ``{adapter, confidence, scores, below_threshold, output}``; ``output`` is None when the
        caller must send the request elsewhere (a merged deployment) or reject it.
        """
        if self.router_cache is None or not self.cfg.router.adapter:
            raise RoutingUnavailable("no routing adapter is configured (router.adapter)")
        name = self.cfg.router.adapter
        try:
            await self.router_cache.ensure([name])
        except AdapterNotFound as e:
            raise RoutingUnavailable(str(e)) from e
        img = open_image(image)
        res = await asyncio.to_thread(self.engine.classify, img, self.cfg.router.prompt, labels, name)
        below = res.confidence < threshold
        adapter: str | None = res.label
        out: dict[str, Any] = {"adapter": adapter, "confidence": res.confidence, "scores": res.scores,
                               "below_threshold": below, "output": None}  # fmt: skip
        if below:
            if below_threshold == "reject":
                return out
            adapter = None
            out["adapter"] = None
        if adapter is None or adapter in answer_here:
            out["output"] = await self._submit(img, prompt, adapter)  # the image decoded once
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "forwards": sum(self.batches.values()),
            "batch_sizes": dict(self.batches),
            "adapters_per_forward": dict(self.mixed),
            "max_adapters_in_one_forward": max(self.mixed, default=0),
            "resident": self.cache.resident,
            "capacity": self.cache.capacity,
            "loads": self.cache.loads,
            "evictions": self.cache.evictions,
            "served": sorted(self.served),
        }

    def check_health(self) -> None:
        if not self.engine.model:
            raise RuntimeError("dynamic: engine has no model")


def _chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i : i + size] for i in range(0, len(names), size)] or [[]]
