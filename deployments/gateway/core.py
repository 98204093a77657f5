"""The gateway's state and its calls to the model deployments, shared by both APIs: live settings,
traffic-aware promotion (which merged deployment answers an adapter), routing on the dynamic
deployment, and one generation per request with its timeout and its fallback from merged to dynamic."""

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.gateway.api import GUARDS, METRICS, api_label
from deployments.gateway.errors import ServiceUnavailable, first_line, translated
from deployments.gateway.middleware import ApiKeys
from deployments.messages import Answer, Query, RouteRequest, RouteResult
from deployments.observability import GatewayMetrics, RequestTrace, current_request_id, request_logger
from deployments.routing import Mode, RoutingPolicy
from deployments.schemas import BadInput
from deployments.settings import GatewaySettings
from moe_core.config import ConfigError, GatewayLive

__all__ = ["GatewayCore", "logger"]

logger = request_logger("gateway")


async def _awaitable(response: Any) -> Any:
    return await response


class GatewayCore:
    """What both APIs' routes build on (:class:`deployments.gateway.service.Gateway` adds the routes)."""

    def __init__(
        self,
        settings: GatewaySettings,
        dynamic: DeploymentHandle | None,
        merged: dict[str, DeploymentHandle],
        slots: Sequence[DeploymentHandle] = (),
        controller: DeploymentHandle | None = None,
    ) -> None:
        self.settings = settings
        self.dynamic = dynamic
        self.merged = merged  # pinned: one merged deployment per adapter the config names
        self.slots = list(slots)  # promotion slots (deployments.slots), assigned by the controller
        self.controller = controller
        self.promoted: dict[str, int] = {}  # adapter -> slot, as the stored assignments say (ready ones)
        self._counts: Counter[str] = Counter()  # requests per adapter since the last report
        self._promotion: asyncio.Task[None] | None = None
        self._live: GatewayLive | None = None
        self._policy: RoutingPolicy | None = None  # set by reconfigure(), which Serve calls before traffic
        self.started_at = time.time()
        self._storage: Any = None  # opened on first use by /adapters (published merged versions)
        self.metrics = GatewayMetrics()
        METRICS[:] = [self.metrics]
        GUARDS.max_body_bytes = settings.limits.max_body_bytes
        GUARDS.keys = ApiKeys.of(settings.api)  # refuses to start when keys are on and none is found
        GUARDS.on_refused = self._refused

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings from `serve deploy`; validated, then swapped in one assignment."""
        live = GatewayLive.from_user_config(user_config, "Gateway")
        s = self.settings
        policy = self._policy_for(live, self.promoted)
        unknown = sorted(set(s.labels.values()) - policy.experts)
        if unknown:
            raise ConfigError(
                f"Gateway user_config: router labels name adapters {unknown} that no deployment serves"
            )
        shadowed = sorted(policy.experts & {s.api.routed_model_name, s.base_model_name})
        if shadowed:
            raise ConfigError(
                f"Gateway user_config: dynamic_adapters: {shadowed} is also the name of the base or the routed "
                "model in the OpenAI API (api.base_model_name, api.routed_model_name); rename one"
            )
        self._policy, self._live = policy, live
        logger.info("gateway: reconfigured: %s", live.model_dump())

    def _policy_for(self, live: GatewayLive, promoted: Mapping[str, int]) -> RoutingPolicy:
        """Routing with the pinned merged adapters and the promoted ones (both answered as merged)."""
        s = self.settings
        return RoutingPolicy(s.labels, set(self.merged) | set(promoted), live, set(s.merged_disabled))

    # ------------------------------------------------------------ promotion
    def _merged_handle(self, adapter: str) -> DeploymentHandle:
        """The merged deployment that answers ``adapter``: its own, or the slot it is promoted to. Raised
        inside the caller's fallback: an adapter demoted since its policy was read goes to dynamic."""
        if adapter in self.merged:
            return self.merged[adapter]
        k = self.promoted.get(adapter)
        if k is None:
            raise ServiceUnavailable(f"adapter {adapter!r} is no longer promoted", "demoted")
        return self.slots[k]

    def _served(self, adapter: str | None) -> None:
        """Count a request for the promotion controller, and make sure the reporting loop runs."""
        if self.controller is None:
            return
        if adapter is not None:
            self._counts[adapter] += 1
        if self._promotion is None or self._promotion.done():
            self._promotion = asyncio.get_running_loop().create_task(self._promotion_loop())

    async def _promotion_loop(self) -> None:
        """Each report interval: send the counts to the controller, and route by the stored assignments."""
        from deployments.slots import read_assignments
        from moe_core.storage.store import Storage

        assert self.controller is not None
        store = Storage.from_config(self.settings.storage)
        while True:
            counts, self._counts = dict(self._counts), Counter()
            try:
                await asyncio.wait_for(_awaitable(self.controller.report.remote(counts)), 5.0)
            except Exception as e:  # the controller restarting: these counts are lost, routing goes on
                logger.warning("gateway: promotion controller did not take the counts (%s)", first_line(e))
            try:
                assignments = await asyncio.to_thread(read_assignments, store, len(self.slots))
                self._route_promoted({a: k for a, k in assignments.routed().items() if a not in self.merged})
            except Exception as e:  # storage unreadable: keep routing as before
                logger.warning("gateway: promotion assignments unreadable (%s)", first_line(e))
            await asyncio.sleep(self.settings.report_interval_s)

    def _route_promoted(self, promoted: dict[str, int]) -> None:
        if promoted == self.promoted:
            return
        logger.info("gateway: promoted adapters now %s (were %s)", promoted, self.promoted)
        self.promoted = promoted
        if self._live is not None:
            self._policy = self._policy_for(self._live, promoted)

    @property
    def policy(self) -> RoutingPolicy:
        if self._policy is None:
            raise ServiceUnavailable(
                "gateway: no live settings yet (the Serve config must carry user_config)"
            )
        return self._policy

    async def _route(
        self,
        policy: RoutingPolicy,
        query: Query,
        prefer_merged: bool | None,
        trace: RequestTrace,
        answer_in_place: bool = True,
    ) -> RouteResult:
        """Classify on the dynamic deployment and decide (answered there when the decision is dynamic and
        ``answer_in_place``); a rejection below the threshold is raised as the 422 naming candidates."""
        if self.dynamic is None:
            raise ServiceUnavailable(
                "routing needs the dynamic deployment, which is disabled; name an expert"
            )
        if not policy.labels:
            raise BadInput("expert", "no router labels are configured; name an expert")
        t0 = time.perf_counter()
        request = RouteRequest(query, policy, prefer_merged, answer_in_place)
        routed: RouteResult = await self._call(self.dynamic.route.remote(request))
        trace.route_s = time.perf_counter() - t0
        d = routed.decision
        c = d.classification
        trace.routed_via, trace.confidence = d.routed_via, c.confidence
        outcome = "reject" if d.action == "reject" else ("base" if d.adapter is None else "answer")
        self.metrics.routed(c.label, c.confidence, outcome, below=d.routed_via == "router-below-threshold")
        if d.action == "reject":
            raise d.rejection(policy.live.confidence_threshold)
        return routed

    async def _generate(
        self, policy: RoutingPolicy, adapter: str | None, target: Mode, query: Query, trace: RequestTrace
    ) -> tuple[Answer, bool]:
        """The answer from ``target``, generated once, and whether it is a fallback from merged."""
        t0 = time.perf_counter()
        self._served(adapter)
        try:
            if target == "merged":
                assert adapter is not None
                try:
                    handle = self._merged_handle(adapter)
                    return await self._call(handle.generate.remote(query, adapter)), False
                except ServiceUnavailable as e:
                    dynamic = self._fall_back(policy, adapter, query, e, trace)
                    return await self._call(dynamic.generate.remote(query, adapter)), True
            return await self._call(self._dynamic(adapter).generate.remote(query, adapter)), False
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
        trace.fallback = e.reason
        self.metrics.fallbacks.inc(tags={"adapter": adapter, "reason": e.reason})
        logger.warning(
            "gateway: %s: merged %s failed (%s); answering from dynamic", query.request_id, adapter, e
        )
        return self.dynamic

    async def _call(self, response: Any, timeout_s: float | None = None) -> Any:
        """Await a deployment call; a failure or a timeout of the callee becomes ServiceUnavailable."""
        timeout_s = timeout_s or self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(_awaitable(response), timeout_s)
        except TimeoutError as e:
            response.cancel()  # never left running: a request is generated at most once
            raise ServiceUnavailable(f"no answer within {timeout_s:.0f}s", "timeout") from e
        except Exception as e:  # the callee failed, or refused the request (4xx)
            raise translated(e) from e

    def _refused(self, path: str, status: int) -> None:
        """Count a request the API-key middleware refused."""
        self.metrics.record(RequestTrace(current_request_id(), api=api_label(path)), status)

    def check_health(self) -> None:
        """Unhealthy until the live settings arrive (a Serve config without user_config shows here)."""
        _ = self.policy
