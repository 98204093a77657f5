"""The HTTP ingress: validates input, routes, and translates every failure to an HTTP status, here only.

No model and no GPU. The image is decoded once to validate it and forwarded as bytes, crossing each
hop once; a request is generated exactly once (merged, or dynamic, or dynamic after a merged failure).
"""

import asyncio
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.routing import RoutingPolicy
from deployments.schemas import (
    AdapterStatus,
    BadInput,
    InferRequest,
    InferResponse,
    LiveRouterConfig,
    decode_image,
    error_body,
)
from moe_core.config import DeploymentConfig

__all__ = ["Router", "ServiceUnavailable", "api"]

logger = logging.getLogger(__name__)

api = FastAPI(
    title="moe-inference-server",
    description="Many LoRA experts of one vision-language model: merged, dynamic and routed.",
    version="0.1.0",
)


class ServiceUnavailable(RuntimeError):
    """No deployment can answer (503)."""


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    field = ".".join(loc) or "body"
    body = error_body(field, str(first.get("msg")))
    body["error"]["details"] = [
        {"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    return JSONResponse(status_code=422, content=body)


def _response(
    out: dict[str, Any], via: str, confidence: float | None, fallback: bool = False
) -> InferResponse:
    return InferResponse(
        task_output=out["text"],
        adapter=out["adapter"],
        mode=out["mode"],
        routed_via=via,  # type: ignore[arg-type]
        confidence=confidence,
        merged_version=out["version"] if out["mode"] == "merged" else None,
        fallback=fallback,
        batch_size=out.get("batch_size"),
        adapters_in_batch=out.get("adapters_in_batch"),
    )


async def _awaitable(response: Any) -> Any:
    return await response


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else ""


@serve.ingress(api)
class Router:
    def __init__(
        self,
        config: dict[str, Any],
        dynamic: DeploymentHandle | None,
        merged: dict[str, DeploymentHandle],
    ) -> None:
        self.cfg = DeploymentConfig.from_static(config)
        self.dynamic = dynamic
        self.merged = merged
        self.policy = RoutingPolicy(
            dict(self.cfg.router.labels),
            set(merged),
            LiveRouterConfig(
                prefer_merged=self.cfg.gateway.prefer_merged,
                fallback_to_dynamic=self.cfg.gateway.fallback_to_dynamic,
                confidence_threshold=self.cfg.router.confidence_threshold,
                below_threshold=self.cfg.router.below_threshold,
                dynamic_adapters=list(self.cfg.dynamic.adapters),
            ),
            {a.name for a in self.cfg.merged.adapters} - set(merged),
        )
        self.started_at = time.time()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings from `serve deploy`; validated, then swapped in one assignment."""
        live = LiveRouterConfig.model_validate(user_config)
        served = set(self.merged) | set(self.policy.dynamic_only_merged) | set(live.dynamic_adapters)
        unknown = sorted(set(self.policy.labels.values()) - served)
        if unknown:
            raise ValueError(f"router labels name adapters {unknown} that no deployment serves")
        self.policy = RoutingPolicy(
            self.policy.labels, self.policy.merged, live, self.policy.dynamic_only_merged
        )
        logger.info("router: reconfigured: %s", live.model_dump())

    # ------------------------------------------------------------------ API
    @api.post("/infer", response_model=InferResponse, responses={404: {}, 413: {}, 422: {}, 503: {}})
    async def infer(self, req: InferRequest) -> Any:
        try:
            return await self._infer(req)
        except BadInput as e:
            return JSONResponse(status_code=e.status, content=error_body(e.field, e.message))
        except ServiceUnavailable as e:
            return JSONResponse(status_code=503, content=error_body("service", str(e)))

    async def _infer(self, req: InferRequest) -> InferResponse:
        limits = self.cfg.limits
        if len(req.prompt) > limits.max_prompt_chars:
            raise BadInput(
                "prompt",
                f"prompt is {len(req.prompt)} characters, over the limit of {limits.max_prompt_chars}",
            )
        policy = self.policy  # one snapshot per request, even across a reconfigure
        image, _ = decode_image(
            req.image_b64, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )
        if req.expert is not None:
            adapter = policy.resolve_expert(req.expert)
            return await self._answer(policy, adapter, image, req, "explicit", None)
        if self.dynamic is None:
            raise ServiceUnavailable(
                "routing needs the dynamic deployment, which is disabled; name an expert"
            )
        labels = policy.label_names()
        if not labels:
            raise BadInput("expert", "no router labels are configured; name an expert")
        routed = await self._call(
            self.dynamic.route.remote(
                image,
                req.prompt,
                labels,
                policy.live.confidence_threshold,
                policy.live.below_threshold,
                policy.answer_in_dynamic(req.prefer_merged),
            )
        )
        confidence = float(routed["confidence"])
        if routed["below_threshold"] and policy.live.below_threshold == "reject":
            top = sorted(routed["scores"].items(), key=lambda kv: -kv[1])[:3]
            cands = ", ".join(f"{n} ({p:.2f})" for n, p in top)
            raise BadInput(
                "expert",
                f"routing confidence {confidence:.2f} is below {policy.live.confidence_threshold}; "
                f"name an expert (candidates: {cands})",
            )
        via = "router-below-threshold" if routed["below_threshold"] else "router"
        if routed["output"] is not None:
            return _response(routed["output"], via, confidence)
        return await self._answer(policy, routed["adapter"], image, req, via, confidence)

    async def _answer(
        self,
        policy: RoutingPolicy,
        adapter: str | None,
        image: bytes,
        req: InferRequest,
        via: str,
        confidence: float | None,
    ) -> InferResponse:
        if policy.target(adapter, req.prefer_merged) == "merged":
            assert adapter is not None
            try:
                out = await self._call(self.merged[adapter].generate.remote(image, req.prompt))
                return _response(out, via, confidence)
            except ServiceUnavailable as e:
                if not policy.live.fallback_to_dynamic or self.dynamic is None:
                    raise
                logger.warning("router: merged %s failed (%s); answering from dynamic", adapter, e)
                out = await self._call(self.dynamic.generate.remote(image, req.prompt, adapter))
                return _response(out, via, confidence, fallback=True)
        if self.dynamic is None:
            raise ServiceUnavailable(f"adapter {adapter!r} has no merged deployment and dynamic is disabled")
        out = await self._call(self.dynamic.generate.remote(image, req.prompt, adapter))
        return _response(out, via, confidence)

    async def _call(self, response: Any, timeout_s: float | None = None) -> dict[str, Any]:
        """Await a deployment call; a failure or a timeout of the callee becomes ServiceUnavailable."""
        timeout_s = timeout_s or self.cfg.gateway.request_timeout_s
        try:
            result: dict[str, Any] = await asyncio.wait_for(_awaitable(response), timeout_s)
            return result
        except TimeoutError as e:
            response.cancel()  # never left running: a request is generated at most once
            raise ServiceUnavailable(f"no answer within {timeout_s:.0f}s") from e
        except Exception as e:  # the callee failed: model missing, replica died, bad adapter
            raise ServiceUnavailable(f"{type(e).__name__}: {_first_line(e)}") from e

    @api.get("/adapters", response_model=list[AdapterStatus])
    async def adapters(self) -> list[AdapterStatus]:
        versions: dict[str, str | None] = {}
        for name, handle in self.merged.items():
            try:
                versions[name] = (await self._call(handle.status.remote(), timeout_s=2.0))["version"]
            except ServiceUnavailable:  # scaled to zero, starting or failing: no version to show
                versions[name] = None
        policy = self.policy
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
        result: dict[str, Any] = await self.dynamic.stats.remote()
        return result
