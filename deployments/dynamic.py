"""The shared dynamic-LoRA deployment: the base model once, adapters from storage in an LRU, and
concurrent requests for different adapters batched into one forward.

``@serve.batch`` is used without ``@serve.multiplexed`` (which would split batches by model id), so a
batch holds rows for any adapters and the engine runs them in one mixed-adapter ``generate``.
The engine and the store are injectable (``engine_factory``, ``storage``) so that batching, refresh
and reconfigure are unit-tested on a fake engine; the end-to-end tests run the real model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from ray import serve

from deployments.adapter_cache import AdapterCache, AdapterNotFound
from deployments.engines import DeploymentEngine, ModelDeployment
from deployments.messages import Answer, DynamicStats, Query, RouteRequest, RouteResult
from deployments.observability import DynamicMetrics
from deployments.routing import Classification, decide
from deployments.schemas import open_image
from deployments.settings import DynamicSettings
from moe_core.config import DynamicLive
from moe_core.engine import GenerationRequest

__all__ = ["AdapterNotServed", "DynamicLoRA", "NotConfigured", "RoutingUnavailable"]

logger = logging.getLogger(__name__)


class AdapterNotServed(LookupError):
    """The adapter is not in this deployment's list or has no published version."""


class RoutingUnavailable(RuntimeError):
    """No routing adapter is published."""


class NotConfigured(RuntimeError):
    """The replica has not received its live settings (its Serve user_config) yet."""


@dataclass(frozen=True)
class _Item:
    image: Image.Image  # decoded once per request, before batching
    query: Query
    adapter: str | None
    arrived: float = field(default_factory=time.perf_counter)


class DynamicLoRA(ModelDeployment[DynamicSettings]):
    def _start(self) -> None:
        settings = self.settings
        self.metrics = DynamicMetrics()
        self.engine: DeploymentEngine = self.engine_factory(settings.engine, None, "dynamic")
        self.live: DynamicLive | None = None  # set by reconfigure(), which Serve calls before traffic
        self.cache: AdapterCache | None = None
        self.router_cache: AdapterCache | None = None
        if settings.router:
            self.router_cache = AdapterCache(
                self.engine,
                self.storage,
                1,
                settings.batching.refresh_interval_s,
                kind="router",
                events=self.metrics,
            )
        self.waiting = 0  # requests submitted, their forward not started
        self.batches: Counter[int] = Counter()  # batch size -> forwards
        self.mixed: Counter[int] = Counter()  # distinct adapters in one forward -> forwards

    # --------------------------------------------------------------- config
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings from `serve deploy` (validated; a bad value is refused naming the field)."""
        live = DynamicLive.from_user_config(user_config, "DynamicLoRA")
        slots = live.max_loaded_adapters + (1 if self.router_cache is not None else 0)  # the router's own
        if self.cache is None:
            self.cache = AdapterCache(
                self.engine,
                self.storage,
                live.max_loaded_adapters,
                self.settings.batching.refresh_interval_s,
                events=self.metrics,
            )
        else:
            self.cache.resize(live.max_loaded_adapters)  # evicts first: the slots shrink after
        self.engine.set_lora_slots(slots, self.settings.max_lora_rank)
        self.live = live
        served = self.served
        for name in [n for n in self.cache.resident if n not in served]:
            self.cache.forget(name)
        logger.info("dynamic: reconfigured: adapters %s, LRU %d", sorted(served), live.max_loaded_adapters)

    @property
    def served(self) -> set[str]:
        """Adapters this deployment answers: the live dynamic list and every merged adapter (fallback)."""
        return set(self._live().adapters) | set(self.settings.merged)

    def _live(self) -> DynamicLive:
        if self.live is None:
            raise NotConfigured("dynamic: no live settings yet (the Serve config must carry user_config)")
        return self.live

    def _cache(self) -> AdapterCache:
        if self.cache is None:
            raise NotConfigured("dynamic: no live settings yet (the Serve config must carry user_config)")
        return self.cache

    # ------------------------------------------------------------ requests
    async def generate(self, query: Query, adapter: str | None) -> Answer:
        return await self._submit(open_image(query.image), query, adapter)

    async def _submit(self, image: Image.Image, query: Query, adapter: str | None) -> Answer:
        if adapter is not None and adapter not in self.served:
            raise AdapterNotServed(f"adapter {adapter!r} is not served by the dynamic deployment")
        self.check_prompt(self.engine, query)  # before the batch: a refused row never joins one
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            result: Answer | BaseException = await self._batched(_Item(image, query, adapter))
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        if isinstance(result, BaseException):  # per-row failures come back as values
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[_Item]) -> list[Answer | BaseException]:
        """One forward per group of at most LRU-capacity adapters (usually the whole batch)."""
        cache = self._cache()
        out: list[Answer | BaseException] = [RuntimeError("row not run")] * len(items)
        adapters = sorted({i.adapter for i in items if i.adapter is not None})
        base_rows = [k for k, i in enumerate(items) if i.adapter is None]
        for n, group in enumerate(_chunks(adapters, cache.capacity)):
            versions, missing = await self._ensure(cache, group)
            for k, item in enumerate(items):
                if item.adapter in missing:
                    out[k] = AdapterNotServed(missing[item.adapter])
            rows = [k for k, i in enumerate(items) if i.adapter in versions] + (base_rows if n == 0 else [])
            await self._run(rows, items, out, versions)
        return out

    @staticmethod
    async def _ensure(cache: AdapterCache, group: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Load ``group``; adapters that have no published version are reported, not fatal."""
        missing: dict[str, str] = {}
        while True:
            todo = [a for a in group if a not in missing]
            try:
                return await cache.ensure(todo), missing
            except AdapterNotFound as e:
                missing[e.name] = str(e)

    async def _run(
        self, rows: list[int], items: list[_Item], out: list[Any], versions: dict[str, str]
    ) -> None:
        if not rows:
            return
        reqs = [
            GenerationRequest(
                items[i].image, items[i].query.prompt, items[i].adapter, bounds=items[i].query.bounds
            )
            for i in rows
        ]
        n_adapters = len({items[i].adapter for i in rows})
        self.metrics.in_flight.set(len(rows))
        self.metrics.rows.observe(len(rows))
        self.metrics.adapters.observe(n_adapters)
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.engine.generate, reqs)
        finally:
            self.metrics.in_flight.set(0)
        self.metrics.forward(
            "dynamic",
            [(items[i].query.request_id, items[i].adapter or "base", items[i].arrived) for i in rows],
            started,
            [r.num_tokens for r in results],
        )
        self.batches[len(rows)] += 1
        self.mixed[n_adapters] += 1
        for i, r in zip(rows, results, strict=True):
            version = versions.get(r.adapter) if r.adapter else None
            out[i] = Answer(
                r.text,
                r.adapter,
                "dynamic",
                version,
                r.batch_size,
                r.adapters_in_batch,
                r.prompt_tokens,
                r.num_tokens,
            )

    async def route(self, req: RouteRequest) -> RouteResult:
        """Classify with the routing adapter (one forward), decide, and answer here when the decision
        is dynamic (one hop); a merged decision or a rejection goes back to the gateway unanswered."""
        name = self.settings.router
        if self.router_cache is None or name is None:
            raise RoutingUnavailable("no routing adapter is configured (router.adapter)")
        try:
            await self.router_cache.ensure([name])
        except AdapterNotFound as e:
            raise RoutingUnavailable(str(e)) from e
        img = open_image(req.query.image)
        labels = req.policy.label_names()
        res = await asyncio.to_thread(
            self.engine.classify, img, self.settings.router_prompt, labels, name, bounds=req.query.bounds
        )
        decision = decide(
            Classification(res.label, res.confidence, res.scores), req.policy, req.prefer_merged
        )
        answer = None
        if decision.action == "answer" and decision.target == "dynamic":
            answer = await self._submit(img, req.query, decision.adapter)  # the image decoded once
        return RouteResult(decision, answer)

    def stats(self) -> DynamicStats:
        cache = self._cache()
        return DynamicStats(
            pid=os.getpid(),
            forwards=sum(self.batches.values()),
            batch_sizes=dict(self.batches),
            adapters_per_forward=dict(self.mixed),
            max_adapters_in_one_forward=max(self.mixed, default=0),
            resident=cache.resident,
            capacity=cache.capacity,
            loads=cache.loads,
            evictions=cache.evictions,
            served=tuple(sorted(self.served)),
        )

    def check_health(self) -> None:
        """Unhealthy until the live settings arrive; the engine's own health is the hardening issue's."""
        self._live()


def _chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i : i + size] for i in range(0, len(names), size)] or [[]]
