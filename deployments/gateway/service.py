"""The gateway Serve runs: both APIs (:mod:`deployments.gateway.infer`,
:mod:`deployments.gateway.openai_routes`) and the operational routes (adapters, health, version, stats),
bound to the FastAPI app as :data:`GatewayIngress`."""

import asyncio
import dataclasses
import os
import time
from typing import Any

from fastapi.responses import JSONResponse, Response
from ray import serve

from deployments.gateway.api import api
from deployments.gateway.errors import ServiceUnavailable
from deployments.gateway.infer import InferRoutes
from deployments.gateway.openai_routes import OpenAIRoutes
from deployments.messages import DynamicStats
from deployments.observability import current_request_id
from deployments.schemas import AdapterStatus, error_body

__all__ = ["Gateway", "GatewayIngress"]


class Gateway(InferRoutes, OpenAIRoutes):
    """The gateway's logic; :data:`GatewayIngress` is this class bound to the FastAPI app for Serve
    (kept apart so the logic is unit-tested without Serve, on fake deployment handles)."""

    @api.get("/adapters", response_model=list[AdapterStatus], responses={503: {}})
    async def adapters(self) -> Any:
        try:
            policy = self.policy
        except ServiceUnavailable as e:
            return JSONResponse(status_code=503, content=error_body("service", str(e), current_request_id()))
        promoted = dict(self.promoted)
        versions = await self._merged_versions(sorted(set(self.merged) | set(promoted)))
        rows = []
        for name in sorted(policy.experts):
            rows.append(
                AdapterStatus(
                    name=name,
                    merged=name in self.merged,
                    serving="pinned"
                    if name in self.merged
                    else "promoted"
                    if name in promoted
                    else "dynamic",
                    slot=promoted.get(name),
                    merged_version=versions.get(name),
                    dynamic=self.dynamic is not None,
                    router_labels=sorted(k for k, v in policy.labels.items() if v == name),
                )
            )
        return rows

    async def _merged_versions(self, names: list[str]) -> dict[str, str | None]:
        """Each merged adapter's published version, read from storage: asking the deployments would wake
        the ones scaled to zero (and wait on each in turn)."""
        if self._storage is None:
            from moe_core.storage.store import Storage

            self._storage = Storage.from_config(self.settings.storage)
        store = self._storage

        def read(name: str) -> str | None:
            try:
                return store.current_version("merged", name)
            except Exception:  # an unreadable pointer: no version to show, the rest of the table stands
                return None

        try:
            found = await asyncio.wait_for(
                asyncio.gather(*(asyncio.to_thread(read, n) for n in names)), timeout=2.0
            )
        except TimeoutError:
            found = [None] * len(names)
        return dict(zip(names, found, strict=True))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - self.started_at, 1), "pid": os.getpid()}

    @api.get("/health")
    async def health(self) -> Response:
        """vLLM's liveness route: 200 with an empty body while the gateway serves (clients such as GuideLLM
        probe it before they start)."""
        return Response(status_code=200)

    @api.get("/version")
    async def version(self) -> dict[str, str]:
        """vLLM's version route: this server's version."""
        return {"version": api.version}

    @api.get("/stats")
    async def stats(self) -> Any:
        """Batching and cache counters of the dynamic deployment (one replica's view)."""
        if self.dynamic is None:
            return {}
        try:
            stats: DynamicStats = await self._call(self.dynamic.stats.remote(), timeout_s=2.0)
        except ServiceUnavailable as e:
            return JSONResponse(status_code=503, content=error_body("service", str(e), current_request_id()))
        return dataclasses.asdict(stats)


GatewayIngress = serve.ingress(api)(Gateway)
