"""Who answers a request, and the one call that answers it, for both APIs and for whole and streamed
answers alike.

- :meth:`Dispatcher._decide`: the named adapter, the base model, or the routing adapter's choice (one hop
  to the dynamic deployment: it classifies, decides, and answers in place when the decision is dynamic,
  saving the second hop: a whole answer with the decision, a stream after it).
- :meth:`Dispatcher._dispatch`: the call to the decided target, with its merged-to-dynamic fallback, in one
  place. A whole answer's call is ``generate``; a stream's is ``stream`` up to its first chunk. Either way
  a request is answered once: the fallback runs only when the merged deployment failed before sending
  anything, and a stream that fails after its first chunk is never restarted.
- :meth:`Dispatcher._answer` and :meth:`Dispatcher._stream`: the two kinds of answer through that call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ray.serve.handle import DeploymentHandle

from deployments.gateway.core import GatewayCore, logger
from deployments.gateway.errors import ServiceUnavailable, translated
from deployments.messages import Answer, Chunk, Query, RouteRequest, RouteResult
from deployments.observability import RequestTrace
from deployments.openai_api.models import ModelChoice
from deployments.routing import Mode, RoutedVia, RoutingPolicy
from deployments.schemas import BadInput

__all__ = ["ChunkStream", "Dispatcher", "Route"]

T = TypeVar("T")


class ChunkStream(Protocol):
    """A streaming handle call's chunks (Serve's ``DeploymentResponseGenerator``)."""

    def __anext__(self) -> Any: ...
    def cancel(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Route:
    """Who answers a request, and how that was decided."""

    adapter: str | None
    target: Mode
    via: RoutedVia
    confidence: float | None = None
    answer: Answer | None = None  # the routing hop's whole answer, when it answered in place
    stream: ChunkStream | None = None  # the routing hop's stream of the answer, when it streams in place


class Dispatcher(GatewayCore):
    """What both APIs' routes call once a request is a query (:mod:`deployments.gateway.pipeline`)."""

    async def _decide(
        self,
        policy: RoutingPolicy,
        choice: ModelChoice,
        query: Query,
        prefer_merged: bool | None,
        trace: RequestTrace,
        whole: bool,
    ) -> Route:
        """Who answers: the named adapter, the base model, or the routing adapter's choice (the routing
        hop answers in place when the decision is dynamic: the whole answer, or a stream unless ``whole``)."""
        if choice.kind == "adapter":
            assert choice.adapter is not None
            trace.routed_via, trace.adapter = "explicit", choice.adapter
            return Route(choice.adapter, policy.target(choice.adapter, prefer_merged), "explicit")
        if choice.kind == "base":
            trace.routed_via = "explicit"
            return Route(None, "dynamic", "explicit")
        trace.routed_via = "router"
        routed, stream = await self._route(policy, query, prefer_merged, trace, whole)
        d = routed.decision
        return Route(d.adapter, d.target, d.routed_via, d.classification.confidence, routed.answer, stream)

    async def _route(
        self,
        policy: RoutingPolicy,
        query: Query,
        prefer_merged: bool | None,
        trace: RequestTrace,
        whole: bool,
    ) -> tuple[RouteResult, ChunkStream | None]:
        """Classify on the dynamic deployment and decide; answered there when the decision is dynamic: the
        whole answer in the result, or the rest of the stream (``route_stream``: the decision, then the
        answer's chunks). A rejection below the threshold is raised as the 422 naming candidates."""
        if self.dynamic is None:
            raise ServiceUnavailable(
                "routing needs the dynamic deployment, which is disabled; name an expert"
            )
        if not policy.labels:
            raise BadInput("expert", "no router labels are configured; name an expert")
        t0 = time.perf_counter()
        request = RouteRequest(query, policy, prefer_merged)
        stream: ChunkStream | None = None
        if whole:
            routed: RouteResult = await self._call(self.dynamic.route.remote(request))
        else:
            stream, first = await self._first(self.dynamic.options(stream=True).route_stream.remote(request))
            if not isinstance(first, RouteResult):
                stream.cancel()
                raise ServiceUnavailable(f"routing: expected the decision first, got {type(first).__name__}")
            routed = first
        trace.route_s = time.perf_counter() - t0
        d = routed.decision
        c = d.classification
        trace.routed_via, trace.confidence = d.routed_via, c.confidence
        outcome = "reject" if d.action == "reject" else ("base" if d.adapter is None else "answer")
        self.metrics.routed(c.label, c.confidence, outcome, below=d.routed_via == "router-below-threshold")
        if d.action == "reject":
            raise d.rejection(policy.live.confidence_threshold)
        in_place = d.action == "answer" and d.target == "dynamic"  # else the routing stream ends here
        return routed, stream if in_place else None

    # ----------------------------------------------------------------- answers
    async def _answer(
        self, policy: RoutingPolicy, route: Route, query: Query, trace: RequestTrace
    ) -> tuple[Answer, bool]:
        """The whole answer, and whether it is a fallback from merged."""
        if route.answer is not None:  # answered where it was routed: it counts for promotion too
            self._served(route.adapter)
            return route.answer, False

        further = self.settings.models.get(route.adapter or "")
        timeout_s = further.request_timeout_s if further is not None else None  # None: the gateway's

        def generate(handle: DeploymentHandle) -> Awaitable[Answer]:
            return self._call(handle.generate.remote(query, route.adapter), timeout_s)

        return await self._dispatch(policy, route, query, trace, generate)

    async def _stream(
        self, policy: RoutingPolicy, route: Route, query: Query, trace: RequestTrace
    ) -> tuple[ChunkStream, Chunk, bool]:
        """The stream, its first chunk (a failure until then is an ordinary error, and a merged
        deployment down by then falls back), and whether it is a fallback from merged; the routing hop's
        own stream when it answers in place."""
        if route.stream is not None:  # the routing hop streams the answer (one hop)
            self._served(route.adapter)
            t0 = time.perf_counter()
            try:
                stream, chunk = await self._first(route.stream)
            finally:
                trace.answer_s = time.perf_counter() - t0
            return stream, chunk, False

        def first(handle: DeploymentHandle) -> Awaitable[tuple[ChunkStream, Chunk]]:
            return self._first(handle.options(stream=True).stream.remote(query, route.adapter))

        (stream, chunk), fallback = await self._dispatch(policy, route, query, trace, first)
        return stream, chunk, fallback

    async def _dispatch(
        self,
        policy: RoutingPolicy,
        route: Route,
        query: Query,
        trace: RequestTrace,
        call: Callable[[DeploymentHandle], Awaitable[T]],
    ) -> tuple[T, bool]:
        """``call`` on the route's target, once, and whether a failed merged deployment fell back to
        dynamic (before it sent anything: the request is still answered once)."""
        adapter = route.adapter
        t0 = time.perf_counter()
        self._served(adapter)
        try:
            if route.target == "merged":
                assert adapter is not None
                try:
                    return await call(self._merged_handle(adapter)), False
                except ServiceUnavailable as e:
                    return await call(self._fall_back(policy, adapter, query, e, trace)), True
            return await call(self._dynamic(adapter)), False
        finally:
            trace.answer_s = time.perf_counter() - t0

    def _dynamic(self, adapter: str | None) -> DeploymentHandle:
        if self.dynamic is None:
            raise ServiceUnavailable(f"adapter {adapter!r} has no merged deployment and dynamic is disabled")
        return self.dynamic

    def _fall_back(
        self, policy: RoutingPolicy, adapter: str, query: Query, e: ServiceUnavailable, trace: RequestTrace
    ) -> DeploymentHandle:
        """The dynamic deployment, to answer for a failed merged one; re-raises ``e`` when not allowed."""
        # a promoted adapter is a dynamic one: it always falls back (fallback_to_dynamic is about pinned ones)
        if self.dynamic is None or (not policy.live.fallback_to_dynamic and adapter in self.merged):
            raise e
        if adapter in policy.models:  # a further full model: the dynamic deployment has no such model
            raise e
        trace.fallback = e.reason
        self.metrics.fallbacks.inc(tags={"adapter": adapter, "reason": e.reason})
        logger.warning(
            "gateway: %s: merged %s failed (%s); answering from dynamic", query.request_id, adapter, e
        )
        return self.dynamic

    # ----------------------------------------------------------------- streams
    async def _first(self, response: Any) -> tuple[ChunkStream, Chunk]:
        """A streaming call (``handle.options(stream=True).stream.remote(...)``) and its first chunk
        (cancelled when none comes)."""
        stream: ChunkStream = response
        try:
            first = await self._next(stream)
        except BaseException:
            stream.cancel()
            raise
        if first is None:
            raise ServiceUnavailable("the stream ended before its first chunk")
        return stream, first

    async def _next(self, stream: ChunkStream) -> Chunk | None:
        """The next chunk (None at the end), within the per-hop timeout."""
        timeout_s = self.settings.request_timeout_s
        try:
            chunk: Chunk = await asyncio.wait_for(stream.__anext__(), timeout_s)
            return chunk
        except StopAsyncIteration:
            return None
        except TimeoutError as e:
            raise ServiceUnavailable(f"no chunk within {timeout_s:.0f}s", "timeout") from e
        except Exception as e:
            raise translated(e) from e
