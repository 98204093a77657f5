"""``POST /infer``: one screenshot and one instruction, to the expert named or the one the router picks."""

import asyncio
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse

from deployments.gateway.api import api
from deployments.gateway.core import GatewayCore
from deployments.gateway.errors import ServiceUnavailable
from deployments.images import check_image, decode_b64
from deployments.messages import Answer, Query, SamplingParams
from deployments.observability import RequestTrace, current_request_id
from deployments.outputs import constraint_of
from deployments.routing import Mode, RoutedVia, RoutingPolicy
from deployments.schemas import (
    BadInput,
    ImageInfo,
    InferRequest,
    InferResponse,
    TokenLogprobInfo,
    Usage,
    error_body,
)
from moe_core.vision import ImagePlan, PixelBounds, plan

__all__ = ["InferRoutes"]


def _response(
    out: Answer,
    image: ImagePlan,
    via: RoutedVia,
    confidence: float | None,
    trace: RequestTrace,
    fallback: bool = False,
    logprobs: bool = False,
) -> InferResponse:
    trace.adapter = out.adapter or "base"
    trace.mode = out.mode if out.adapter else "base"
    trace.prompt_tokens, trace.completion_tokens = out.prompt_tokens, out.completion_tokens
    trace.replica_s, trace.engine_s = out.replica_s, out.engine_s
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
            cached_tokens=out.cached_tokens,
        ),
        logprobs=[TokenLogprobInfo(token=lp.token, logprob=lp.logprob) for lp in out.logprobs]
        if logprobs
        else None,
        answer_logprob=sum(lp.logprob for lp in out.logprobs) if logprobs else None,
    )


class InferRoutes(GatewayCore):
    """The ``/infer`` API of :class:`deployments.gateway.service.Gateway`."""

    @api.post("/infer", response_model=InferResponse, responses={404: {}, 413: {}, 422: {}, 503: {}})
    async def infer(self, req: InferRequest, http: Response) -> Any:
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
        (http if status == 200 else response).headers["Server-Timing"] = trace.server_timing()
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
        query, image = await asyncio.to_thread(self._query, req, trace)  # decoding never stalls the loop
        if req.expert is not None:
            adapter = policy.resolve_expert(req.expert)
            trace.adapter = adapter
            target = policy.target(adapter, req.prefer_merged)
            return await self._answer(policy, adapter, target, query, image, "explicit", None, trace)
        routed = await self._route(policy, query, req.prefer_merged, trace)
        d = routed.decision
        c = d.classification
        if routed.answer is not None:
            self._served(d.adapter)  # answered where it was routed: it counts for promotion too
            return _response(
                routed.answer, image, d.routed_via, c.confidence, trace, logprobs=bool(req.logprobs)
            )
        return await self._answer(
            policy, d.adapter, d.target, query, image, d.routed_via, c.confidence, trace
        )

    def _query(self, req: InferRequest, trace: RequestTrace) -> tuple[Query, ImagePlan]:
        """Decode and check the image; resolve the pixels the model sees of it and what they cost in tokens."""
        limits = self.settings.limits
        data = decode_b64(req.image_b64, max_bytes=limits.max_image_bytes)
        img = check_image(  # from its header: the pixels are decoded once, in the replica
            data,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            formats=limits.image_formats,
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
        constraint = constraint_of(req)
        sampling = SamplingParams(
            constraint=constraint, expert_grammar=constraint is None, logprobs=0 if req.logprobs else None
        )
        return Query(data, req.prompt, bounds, image.tokens, trace.request_id, sampling), image

    async def _answer(
        self,
        policy: RoutingPolicy,
        adapter: str | None,
        target: Mode,
        query: Query,
        image: ImagePlan,
        via: RoutedVia,
        confidence: float | None,
        trace: RequestTrace,
    ) -> InferResponse:
        """Generate on ``target``, once; a failed merged deployment falls back to dynamic when allowed."""
        out, fallback = await self._generate(policy, adapter, target, query, trace)
        logprobs = query.sampling.logprobs is not None
        return _response(out, image, via, confidence, trace, fallback=fallback, logprobs=logprobs)
