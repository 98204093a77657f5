"""The gateway, the HTTP ingress: validates input, routes, and translates every failure to an HTTP status,
here only.

No model and no GPU. The image is decoded once to validate it and forwarded as bytes, crossing each
hop once; a request is generated exactly once (merged, or dynamic, or dynamic after a merged failure).
"""

import asyncio
import dataclasses
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.messages import Answer, DynamicStats, MergedStatus, Query, RouteRequest, RouteResult
from deployments.observability import GatewayMetrics, RequestTrace, current_request_id, request_logger
from deployments.routing import RoutedVia, RoutingPolicy, Target
from deployments.schemas import (
    AdapterStatus,
    BadInput,
    ImageInfo,
    InferRequest,
    InferResponse,
    Usage,
    decode_image,
    error_body,
)
from deployments.settings import GatewaySettings
from moe_core.config import ConfigError, GatewayLive
from moe_core.vision import ImagePlan, PixelBounds, plan

__all__ = ["Gateway", "GatewayIngress", "ServiceUnavailable", "api"]

logger = request_logger("gateway")

api = FastAPI(
    title="moe-inference-server",
    description="Many LoRA experts of one vision-language model: merged, dynamic and routed.",
    version="0.1.0",
)


class ServiceUnavailable(RuntimeError):
    """No deployment can answer (503); ``reason`` is a short label for metrics (timeout, error, ...)."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


#: The replica's gateway metrics, for the request-validation handler (which sees no Gateway instance).
_METRICS: list[GatewayMetrics] = []


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    field = ".".join(loc) or "body"
    trace = RequestTrace(current_request_id())
    body = error_body(field, str(first.get("msg")), trace.request_id)
    body["error"]["details"] = [
        {"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    for metrics in _METRICS:
        metrics.record(trace, 422)
    return JSONResponse(status_code=422, content=body)


def _response(
    out: Answer,
    image: ImagePlan,
    via: RoutedVia,
    confidence: float | None,
    trace: RequestTrace,
    fallback: bool = False,
) -> InferResponse:
    trace.adapter = out.adapter or "base"
    trace.mode = out.mode if out.adapter else "base"
    trace.prompt_tokens, trace.completion_tokens = out.prompt_tokens, out.completion_tokens
    return InferResponse(
        request_id=trace.request_id,
        task_output=out.text,
        adapter=out.adapter,
        mode=out.mode,
        routed_via=via,
        confidence=confidence,
        merged_version=out.version if out.mode == "merged" else None,
        fallback=fallback,
        batch_size=out.batch_size,
        adapters_in_batch=out.adapters_in_batch,
        image=ImageInfo(
            width=image.width,
            height=image.height,
            model_width=image.model_width,
            model_height=image.model_height,
            tokens=image.tokens,
        ),
        usage=Usage(
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            total_tokens=out.prompt_tokens + out.completion_tokens,
            image_tokens=image.tokens,
        ),
    )


async def _awaitable(response: Any) -> Any:
    return await response


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else ""


class Gateway:
    """The gateway's logic; :data:`GatewayIngress` is this class bound to the FastAPI app for Serve
    (kept apart so the logic is unit-tested without Serve, on fake deployment handles)."""

    def __init__(
        self,
        settings: GatewaySettings,
        dynamic: DeploymentHandle | None,
        merged: dict[str, DeploymentHandle],
    ) -> None:
        self.settings = settings
        self.dynamic = dynamic
        self.merged = merged
        self._policy: RoutingPolicy | None = None  # set by reconfigure(), which Serve calls before traffic
        self.started_at = time.time()
        self.metrics = GatewayMetrics()
        _METRICS[:] = [self.metrics]

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings from `serve deploy`; validated, then swapped in one assignment."""
        live = GatewayLive.from_user_config(user_config, "Gateway")
        s = self.settings
        policy = RoutingPolicy(s.labels, set(self.merged), live, set(s.merged_disabled))
        unknown = sorted(set(s.labels.values()) - policy.experts)
        if unknown:
            raise ConfigError(
                f"Gateway user_config: router labels name adapters {unknown} that no deployment serves"
            )
        self._policy = policy
        logger.info("gateway: reconfigured: %s", live.model_dump())

    @property
    def policy(self) -> RoutingPolicy:
        if self._policy is None:
            raise ServiceUnavailable(
                "gateway: no live settings yet (the Serve config must carry user_config)"
            )
        return self._policy

    # ------------------------------------------------------------------ API
    @api.post("/infer", response_model=InferResponse, responses={404: {}, 413: {}, 422: {}, 503: {}})
    async def infer(self, req: InferRequest) -> Any:
        trace = RequestTrace(
            current_request_id(), routed_via="explicit" if req.expert is not None else "router"
        )
        try:
            response: Any = await self._infer(req, trace)
            status = 200
        except BadInput as e:
            status = e.status
            response = JSONResponse(
                status_code=status, content=error_body(e.field, e.message, trace.request_id)
            )
        except ServiceUnavailable as e:
            status = 503
            response = JSONResponse(
                status_code=status, content=error_body("service", str(e), trace.request_id)
            )
        self.metrics.record(trace, status)
        return response

    async def _infer(self, req: InferRequest, trace: RequestTrace | None = None) -> InferResponse:
        trace = trace or RequestTrace(current_request_id())
        limits = self.settings.limits
        if len(req.prompt) > limits.max_prompt_chars:
            raise BadInput(
                "prompt",
                f"prompt is {len(req.prompt)} characters, over the limit of {limits.max_prompt_chars}",
            )
        policy = self.policy  # one snapshot per request, even across a reconfigure
        query, image = self._query(req, trace)
        if req.expert is not None:
            adapter = policy.resolve_expert(req.expert)
            trace.adapter = adapter
            target = policy.target(adapter, req.prefer_merged)
            return await self._answer(policy, adapter, target, query, image, "explicit", None, trace)
        if self.dynamic is None:
            raise ServiceUnavailable(
                "routing needs the dynamic deployment, which is disabled; name an expert"
            )
        if not policy.labels:
            raise BadInput("expert", "no router labels are configured; name an expert")
        t0 = time.perf_counter()
        routed: RouteResult = await self._call(
            self.dynamic.route.remote(RouteRequest(query, policy, req.prefer_merged))
        )
        trace.route_s = time.perf_counter() - t0
        d = routed.decision
        c = d.classification
        trace.routed_via, trace.confidence = d.routed_via, c.confidence
        outcome = "reject" if d.action == "reject" else ("base" if d.adapter is None else "answer")
        self.metrics.routed(c.label, c.confidence, outcome, below=d.routed_via == "router-below-threshold")
        if d.action == "reject":
            raise d.rejection(policy.live.confidence_threshold)
        if routed.answer is not None:
            return _response(routed.answer, image, d.routed_via, c.confidence, trace)
        return await self._answer(
            policy, d.adapter, d.target, query, image, d.routed_via, c.confidence, trace
        )

    def _query(self, req: InferRequest, trace: RequestTrace) -> tuple[Query, ImagePlan]:
        """Decode and check the image; resolve the pixels the model sees of it and what they cost in tokens."""
        limits = self.settings.limits
        data, img = decode_image(
            req.image_b64, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )
        trace.pixels = img.width * img.height
        try:
            bounds = PixelBounds(limits.min_pixels, limits.max_pixels).narrowed(
                req.min_pixels, req.max_pixels
            )
        except ValueError as e:
            raise BadInput(str(e).split(" ", 1)[0], str(e)) from e
        try:
            image = plan(img.width, img.height, bounds, self.settings.image_factor)
        except ValueError as e:  # qwen-vl-utils refuses aspect ratios over 200:1
            raise BadInput("image_b64", f"image is {img.width}x{img.height}: {e}") from e
        if image.tokens > limits.max_prompt_tokens:
            raise BadInput(
                "image_b64",
                f"image is {image.tokens} tokens at {image.model_width}x{image.model_height} (from "
                f"{img.width}x{img.height}), over the prompt limit of {limits.max_prompt_tokens} tokens; "
                "send a smaller image or a lower max_pixels",
                413,
            )
        trace.image_tokens = image.tokens
        return Query(data, req.prompt, bounds, image.tokens, trace.request_id), image

    async def _answer(
        self,
        policy: RoutingPolicy,
        adapter: str | None,
        target: Target,
        query: Query,
        image: ImagePlan,
        via: RoutedVia,
        confidence: float | None,
        trace: RequestTrace,
    ) -> InferResponse:
        """Generate on ``target``, once; a failed merged deployment falls back to dynamic when allowed."""
        t0 = time.perf_counter()
        try:
            if target == "merged":
                assert adapter is not None
                try:
                    out = await self._call(self.merged[adapter].generate.remote(query))
                    return _response(out, image, via, confidence, trace)
                except ServiceUnavailable as e:
                    if not policy.live.fallback_to_dynamic or self.dynamic is None:
                        raise
                    trace.fallback = e.reason
                    self.metrics.fallbacks.inc(tags={"adapter": adapter, "reason": e.reason})
                    logger.warning(
                        "gateway: %s: merged %s failed (%s); answering from dynamic",
                        query.request_id,
                        adapter,
                        e,
                    )
                    out = await self._call(self.dynamic.generate.remote(query, adapter))
                    return _response(out, image, via, confidence, trace, fallback=True)
            if self.dynamic is None:
                raise ServiceUnavailable(
                    f"adapter {adapter!r} has no merged deployment and dynamic is disabled"
                )
            out = await self._call(self.dynamic.generate.remote(query, adapter))
            return _response(out, image, via, confidence, trace)
        finally:
            trace.answer_s = time.perf_counter() - t0

    async def _call(self, response: Any, timeout_s: float | None = None) -> Any:
        """Await a deployment call; a failure or a timeout of the callee becomes ServiceUnavailable."""
        timeout_s = timeout_s or self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(_awaitable(response), timeout_s)
        except TimeoutError as e:
            response.cancel()  # never left running: a request is generated at most once
            raise ServiceUnavailable(f"no answer within {timeout_s:.0f}s", "timeout") from e
        except Exception as e:  # the callee failed: model missing, replica died, bad adapter
            cause = getattr(e, "cause", e)  # a RayTaskError carries what the deployment raised
            if isinstance(cause, BadInput):  # the request's own fault, found where the model is (4xx)
                raise cause from e
            raise ServiceUnavailable(f"{type(e).__name__}: {_first_line(e)}", "error") from e

    def check_health(self) -> None:
        """Unhealthy until the live settings arrive (a Serve config without user_config shows here)."""
        _ = self.policy

    @api.get("/adapters", response_model=list[AdapterStatus], responses={503: {}})
    async def adapters(self) -> Any:
        try:
            policy = self.policy
        except ServiceUnavailable as e:
            return JSONResponse(status_code=503, content=error_body("service", str(e), current_request_id()))
        versions: dict[str, str | None] = {}
        for name, handle in self.merged.items():
            try:
                status: MergedStatus = await self._call(handle.status.remote(), timeout_s=2.0)
                versions[name] = status.version
            except ServiceUnavailable:  # scaled to zero, starting or failing: no version to show
                versions[name] = None
        rows = []
        for name in sorted(policy.experts):
            rows.append(
                AdapterStatus(
                    name=name,
                    merged=name in self.merged,
                    merged_version=versions.get(name),
                    dynamic=self.dynamic is not None,
                    router_labels=sorted(k for k, v in policy.labels.items() if v == name),
                )
            )
        return rows

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - self.started_at, 1), "pid": os.getpid()}

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """Batching and cache counters of the dynamic deployment (one replica's view)."""
        if self.dynamic is None:
            return {}
        stats: DynamicStats = await self.dynamic.stats.remote()
        return dataclasses.asdict(stats)


GatewayIngress = serve.ingress(api)(Gateway)
