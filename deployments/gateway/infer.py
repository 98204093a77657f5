"""``POST /infer``: one screenshot and one instruction, to the expert named or the one the router picks."""

from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse

from deployments.gateway.api import api
from deployments.gateway.dispatch import Dispatcher, Route
from deployments.gateway.errors import ServiceUnavailable
from deployments.gateway.pipeline import Intake, ParsedRequest, take
from deployments.images import ImageInput
from deployments.messages import Answer
from deployments.observability import RequestTrace, current_request_id
from deployments.openai_api.models import ModelChoice
from deployments.openai_api.outputs import constraint_of
from deployments.schemas import (
    BadInput,
    InferRequest,
    InferResponse,
    TokenLogprobInfo,
    Usage,
    error_body,
)
from moe_core.generation import SamplingParams

__all__ = ["InferRoutes"]


def _parsed(req: InferRequest) -> ParsedRequest:
    """``/infer``'s fields in the pipeline's terms: one screenshot (base64) and one instruction."""
    constraint = constraint_of(req)
    sampling = SamplingParams(
        constraint=constraint, expert_grammar=constraint is None, logprobs=0 if req.logprobs else None
    )
    return ParsedRequest(
        req.prompt,
        (ImageInput(req.image_b64, "image_b64"),),
        "image_b64",
        len(req.prompt),
        "prompt",
        sampling,
        req.min_pixels,
        req.max_pixels,
    )


def _response(
    out: Answer, taken: Intake, route: Route, trace: RequestTrace, fallback: bool, logprobs: bool
) -> InferResponse:
    trace.answered(out.adapter, out.mode)
    trace.prompt_tokens, trace.completion_tokens = out.prompt_tokens, out.completion_tokens
    trace.replica_s, trace.engine_s = out.replica_s, out.engine_s
    # /infer's flat answer; chat's MoeInfo (openai_routes) names the same facts in OpenAI's nested shape
    return InferResponse(
        request_id=trace.request_id,
        task_output=out.text,
        adapter=out.adapter,
        mode=out.mode,
        routed_via=route.via,
        confidence=route.confidence,
        merged_version=out.version if out.mode == "merged" else None,
        fallback=fallback,
        batch_size=out.batch_size,
        adapters_in_batch=out.adapters_in_batch,
        image=taken.image_info[0],
        usage=Usage(
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            total_tokens=out.prompt_tokens + out.completion_tokens,
            image_tokens=taken.query.image_tokens,
            cached_tokens=out.cached_tokens,
        ),
        logprobs=[TokenLogprobInfo(token=lp.token, logprob=lp.logprob) for lp in out.logprobs]
        if logprobs
        else None,
        answer_logprob=sum(lp.logprob for lp in out.logprobs) if logprobs else None,
    )


class InferRoutes(Dispatcher):
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
        policy = self.policy  # one snapshot per request, even across a reconfigure
        choice = (
            ModelChoice("adapter", policy.resolve_expert(req.expert))
            if req.expert is not None
            else ModelChoice("routed")
        )
        taken = await take(_parsed(req), self.settings.for_model(choice.adapter), trace)
        route = await self._decide(policy, choice, taken.query, req.prefer_merged, trace, whole=True)
        out, fallback = await self._answer(policy, route, taken.query, trace)
        return _response(out, taken, route, trace, fallback, logprobs=bool(req.logprobs))
