"""The shared dynamic-LoRA deployment: the base model once, adapters from storage in an LRU of LoRA
slots, and every request, whatever its adapter, decoded in one running batch (continuous batching).

The engine's scheduler batches per decode step (no ``@serve.batch``, whose batches are per call and
split by multiplexed model id): requests for different adapters join and leave the same forward.
``stream`` is a generator method (Ray Serve streaming); ``generate`` returns the whole answer. ``route``
classifies and decides, and answers in place when the decision is dynamic (``route_stream``: the decision,
then the answer's chunks). The
engine and the store are injectable (``engine_factory``, ``storage``) so that the deployment's logic
is unit-tested on a fake engine; the end-to-end tests run the real model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from PIL import Image

from deployments.errors import BadInput
from deployments.messages import Answer, Chunk, DynamicStats, Query, RouteRequest, RouteResult
from deployments.models.adapter_cache import AdapterCache, AdapterNotFound, CacheBusy
from deployments.models.engines import (
    DeploymentEngine,
    ModelDeployment,
    answer_of,
    engine_refusal,
    engine_stats,
)
from deployments.observability import DynamicMetrics
from deployments.routing import Decision, decide
from deployments.settings import DynamicSettings
from moe_core.config import DynamicLive
from moe_core.engine import GenerationRequest, Turn
from moe_core.engine.request import Completion, Delta
from moe_core.generation import SamplingParams

__all__ = ["AdapterNotServed", "DynamicLoRA", "NotConfigured", "RoutingUnavailable"]

logger = logging.getLogger(__name__)


class AdapterNotServed(LookupError):
    """The adapter is not in this deployment's list or has no published version."""


class RoutingUnavailable(RuntimeError):
    """No routing adapter is published."""


class NotConfigured(RuntimeError):
    """The replica has not received its live settings (its Serve user_config) yet."""


class DynamicLoRA(ModelDeployment[DynamicSettings]):
    def expected_errors(self) -> dict[type[BaseException], int]:
        # an adapter no longer configured or not published (a 404/503 at the gateway), the cache full
        return super().expected_errors() | {AdapterNotServed: logging.WARNING, CacheBusy: logging.WARNING}

    def _start(self) -> None:
        settings = self.settings
        self.metrics = DynamicMetrics()
        self.engine: DeploymentEngine = self.make_engine(None, "dynamic")
        self.live: DynamicLive | None = None  # set by reconfigure(), which Serve calls before traffic
        self.cache: AdapterCache | None = None
        self.router_cache: AdapterCache | None = None
        if settings.router:
            self.router_cache = AdapterCache(
                self.engine,
                self.storage,
                1,
                settings.batching.refresh_interval_s,
                wait_s=settings.adapter_wait_s,
                kind="router",
                events=self.metrics,
                busy=self.engine.in_use,
            )
        self.batches: Counter[int] = Counter()  # most rows in a step while a request ran -> requests
        self.mixed: Counter[int] = Counter()  # most adapters in a step while a request ran -> requests

    # --------------------------------------------------------------- config
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings from `serve deploy` (validated; a bad value is refused naming the field)."""
        live = DynamicLive.from_user_config(user_config, "DynamicLoRA")
        router_slot = 1 if self.router_cache is not None else 0  # the routing adapter's own LoRA slot
        lora_slots = live.max_loaded_adapters + router_slot
        if self.cache is None:
            self.cache = AdapterCache(
                self.engine,
                self.storage,
                live.max_loaded_adapters,
                self.settings.batching.refresh_interval_s,
                wait_s=self.settings.adapter_wait_s,
                events=self.metrics,
                busy=self.engine.in_use,
            )
        else:
            self.cache.resize(live.max_loaded_adapters)  # evicts first: the LoRA slots shrink after
        self.engine.set_lora_slots(lora_slots, self.settings.max_lora_rank)
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
        """The whole answer of ``adapter`` (None: the bare base model) to ``query``."""
        t0 = time.perf_counter()
        request, params, version = await self._prepare(query, adapter)
        try:
            done = await self.engine.generate(request, params, request_id=query.request_id)
        except Exception as e:
            raise self._failed(e) from e
        self._finished(query, adapter, done)
        return answer_of(done, adapter, "dynamic", version, done.adapters_in_batch, t0)

    async def stream(self, query: Query, adapter: str | None) -> AsyncIterator[Chunk]:
        """The answer as it is decoded (Ray Serve streaming: ``handle.options(stream=True)``)."""
        request, params, version = await self._prepare(query, adapter)
        try:
            async for d in self.engine.stream(request, params, request_id=query.request_id):
                if d.timings is not None:
                    self._finished(query, adapter, d)
                yield Chunk.of(d, adapter, "dynamic", version)
        except Exception as e:
            raise self._failed(e) from e

    async def _prepare(
        self, query: Query, adapter: str | None
    ) -> tuple[GenerationRequest, SamplingParams, str | None]:
        """The engine's request (sampling checked) and its adapter made resident; nothing is queued yet.
        The engine checks the prompt's length as it queues it (a refused row never joins a batch)."""
        if adapter is not None and adapter not in self.served:
            raise AdapterNotServed(f"adapter {adapter!r} is not served by the dynamic deployment")
        request, params = self.request(query, adapter)
        version = None
        if adapter is not None:
            try:
                version = (await self._cache().ensure([adapter]))[adapter]
            except AdapterNotFound as e:
                raise AdapterNotServed(str(e)) from e
        self.metrics.engine_state(self._engine_state())
        return request, params, version  # queued by the caller with no await between: the adapter stays

    def _engine_state(self) -> dict[str, int]:
        return engine_stats(self.engine)

    def _failed(self, e: Exception) -> Exception:
        """An engine refusal as the client's error (4xx), a full queue as is (503)."""
        return engine_refusal(e, self.metrics.rejected.inc)

    def _finished(self, query: Query, adapter: str | None, done: Completion | Delta) -> None:
        assert done.timings is not None
        self.metrics.finished(
            "dynamic",
            adapter or "base",
            query.request_id,
            done.timings,
            done.prompt_tokens,
            done.completion_tokens,
        )
        self.metrics.rows.observe(done.batch_size)
        self.metrics.adapters.observe(done.adapters_in_batch)
        self.batches[done.batch_size] += 1
        self.mixed[done.adapters_in_batch] += 1
        self.metrics.engine_state(self._engine_state())

    async def route(self, req: RouteRequest) -> RouteResult:
        """Classify with the routing adapter (one forward), decide, and answer here when the decision
        is dynamic (one hop); a merged decision or a rejection goes back to the gateway unanswered."""
        decision = await self._decide(req)
        answer = None
        if _answered_here(decision):
            answer = await self.generate(req.query, decision.adapter)
        return RouteResult(decision, answer)

    async def route_stream(self, req: RouteRequest) -> AsyncIterator[RouteResult | Chunk]:
        """:meth:`route` for a streamed request (Ray Serve streaming): the decision first (never with an
        answer), then, when it is dynamic, the answer's chunks as they are decoded here (one hop)."""
        decision = await self._decide(req)
        yield RouteResult(decision, None)
        if _answered_here(decision):
            async for chunk in self.stream(req.query, decision.adapter):
                yield chunk

    async def _decide(self, req: RouteRequest) -> Decision:
        """The routing adapter's classification of the query's screenshot, and the decision on it."""
        name = self.settings.router
        if self.router_cache is None or name is None:
            raise RoutingUnavailable("no routing adapter is configured (router.adapter)")
        try:
            await self.router_cache.ensure([name])
        except AdapterNotFound as e:
            raise RoutingUnavailable(str(e)) from e
        q = req.query
        if q.image is None:
            raise BadInput("messages", "routing needs a screenshot: send an image, or name an expert")
        system = Turn[Image.Image]("system", ("",), inline=True)  # the routing adapter's: no system text
        image, key = self.images.open(q.image)  # decoded once: the answer in place reads it again
        request = GenerationRequest(
            None,
            self.settings.router_prompt,
            name,
            bounds=q.bounds,
            turns=(system, Turn("user", (image, self.settings.router_prompt))),
            image_key=key,  # the features serve the answer too
        )
        try:
            res = await self.engine.classify(request, req.policy.label_names(), request_id=q.request_id)
        except Exception as e:
            raise self._failed(e) from e
        return decide(res, req.policy, req.prefer_merged)

    def stats(self) -> DynamicStats:
        cache = self._cache()
        return DynamicStats(
            pid=os.getpid(),
            answered=sum(self.batches.values()),
            answers_by_batch_size=dict(self.batches),
            answers_by_adapters_in_step=dict(self.mixed),
            max_adapters_in_one_step=max(self.mixed, default=0),
            resident=cache.resident,
            capacity=cache.capacity,
            loads=cache.loads,
            evictions=cache.evictions,
            served=tuple(sorted(self.served)),
            images_decoded=self.images.decodes,
        )

    def check_health(self) -> None:
        """Unhealthy until the live settings arrive, and when the engine cannot run (its device fails,
        its scheduler thread died): Serve then replaces the replica."""
        self._live()
        self.engine.check_health()


def _answered_here(decision: Decision) -> bool:
    """The routing hop answers too: the decision is to answer on the dynamic deployment."""
    return decision.action == "answer" and decision.target == "dynamic"
