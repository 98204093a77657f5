"""The gateway's state, shared by both APIs: live settings, traffic-aware promotion (which merged
deployment answers an adapter), and a deployment call with its timeout (who answers a request and the
call that answers it: :mod:`deployments.gateway.dispatch`)."""

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.gateway.api import GUARDS, METRICS, api_label
from deployments.gateway.errors import ServiceUnavailable, first_line, translated
from deployments.gateway.middleware import ApiKeys
from deployments.observability import GatewayMetrics, RequestTrace, current_request_id, request_logger
from deployments.promotion.policy import read_assignments
from deployments.routing import RoutingPolicy
from deployments.settings import GatewaySettings
from moe_core.config import ConfigError, GatewayLive
from moe_core.storage.store import Storage

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
        self.slots = list(slots)  # promotion slots (deployments.promotion.slots), assigned by the controller
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
        pinned = (set(self.merged) - set(s.models)) | set(promoted)
        return RoutingPolicy(s.labels, pinned, live, set(s.merged_disabled), set(s.models))

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
        if adapter is not None and adapter not in self.settings.models:  # a full model is never promoted
            self._counts[adapter] += 1
        if self._promotion is None or self._promotion.done():
            self._promotion = asyncio.get_running_loop().create_task(self._promotion_loop())

    async def _promotion_loop(self) -> None:
        """Each report interval: send the counts to the controller, and route by the stored assignments."""

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
