"""The gateway's FastAPI app: its middlewares and how it answers a request that fails validation; the
routes are the methods of :class:`deployments.gateway.service.Gateway` and its bases."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from deployments.gateway.middleware import ApiKeyMiddleware, BodyLimitMiddleware, GuardSettings
from deployments.observability import GatewayMetrics, RequestTrace, current_request_id
from deployments.openai_api.errors import ErrorResponse, validation_error
from deployments.schemas import error_body

__all__ = ["GUARDS", "METRICS", "V1_ERRORS", "api", "api_label"]

api = FastAPI(
    title="moe-inference-server",
    description="Many LoRA experts of one vision-language model: merged, dynamic and routed. `POST /infer`, "
    "and the OpenAI-compatible `/v1/chat/completions` and `/v1/models` (the model is an expert adapter, "
    "the base model or the routed model `auto`).",
    version="0.1.0",
)
#: What the middlewares enforce: the replica's gateway sets the keys, the body limit and the metrics callback
#: when it starts (:class:`deployments.gateway.core.GatewayCore`).
GUARDS = GuardSettings()


def guards() -> GuardSettings:
    """This process's :data:`GUARDS`, looked up by the middlewares at each request. Serve pickles the
    ingress app, middleware options included, by value: an object handed to the middlewares would be a
    copy the gateway never fills in (the keys were then never checked), while this function travels by
    reference and finds the replica's own module."""
    return GUARDS


api.add_middleware(ApiKeyMiddleware, settings=guards)
# outermost: an oversized body is refused before anything reads it
api.add_middleware(BodyLimitMiddleware, settings=guards)
#: OpenAI's error shape, for the OpenAPI schema of the /v1 routes.
V1_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)
}

#: The replica's gateway metrics, for the request-validation handler (which sees no Gateway instance).
METRICS: list[GatewayMetrics] = []


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if "/v1/" in request.url.path:  # the OpenAI API: a 400 in OpenAI's shape, naming the field
        trace = RequestTrace(current_request_id(), api=api_label(request.url.path))
        for metrics in METRICS:
            metrics.record(trace, 400)
        return validation_error(list(errors)).response()
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    field = ".".join(loc) or "body"
    trace = RequestTrace(current_request_id())
    body = error_body(field, str(first.get("msg")), trace.request_id)
    body["error"]["details"] = [
        {"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    for metrics in METRICS:
        metrics.record(trace, 422)
    return JSONResponse(status_code=422, content=body)


def api_label(path: str) -> str:
    """The ``api`` label of a request's metrics."""
    if "/v1/chat/" in path:
        return "chat"
    if "/v1/" in path:
        return "models"
    return "infer"
