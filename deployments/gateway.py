"""The gateway, the HTTP ingress: validates input, routes, and translates every failure to an HTTP status,
here only.

No model and no GPU. The image is decoded once to validate it and forwarded as bytes, crossing each
hop once; a request is generated exactly once (merged, or dynamic, or dynamic after a merged failure).
Two APIs over the same deployments: ``POST /infer`` (one screenshot, one instruction) and the
OpenAI-compatible ``/v1`` (:mod:`deployments.openai_api`: chat completions, streamed or not, and the
model list), each with its own error shape.
"""

import asyncio
import dataclasses
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.messages import (
    Answer,
    Chunk,
    DynamicStats,
    Query,
    RouteRequest,
    RouteResult,
    Sampling,
    TokenLogprob,
)
from deployments.observability import GatewayMetrics, RequestTrace, current_request_id, request_logger
from deployments.openai_api import (
    DONE,
    ApiError,
    ApiKeyMiddleware,
    ApiKeys,
    BodyLimitMiddleware,
    ChatCompletion,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionUsage,
    Conversation,
    ErrorResponse,
    ModelCard,
    ModelChoice,
    ModelList,
    MoeInfo,
    build_conversation,
    calls_tools,
    chat_completion,
    check_request,
    completion_id,
    model_list,
    moe_headers,
    on_refused,
    resolve_model,
    routing_available,
    set_api_keys,
    set_body_limit,
    validation_error,
)
from deployments.outputs import constraint_of
from deployments.routing import RoutedVia, RoutingPolicy, Target
from deployments.schemas import (
    AdapterStatus,
    BadInput,
    ImageInfo,
    InferRequest,
    InferResponse,
    TokenLogprobInfo,
    Usage,
    decode_image,
    error_body,
)
from deployments.settings import GatewaySettings
from deployments.tool_calls import ToolCall, ToolCallParser
from moe_core.config import ConfigError, GatewayLive
from moe_core.vision import ImagePlan, PixelBounds, plan

__all__ = ["Gateway", "GatewayIngress", "ServiceUnavailable", "api"]

logger = request_logger("gateway")

api = FastAPI(
    title="moe-inference-server",
    description="Many LoRA experts of one vision-language model: merged, dynamic and routed. `POST /infer`, "
    "and the OpenAI-compatible `/v1/chat/completions` and `/v1/models` (the model is an expert adapter, "
    "the base model or the routed model `auto`).",
    version="0.1.0",
)
api.add_middleware(ApiKeyMiddleware)
api.add_middleware(BodyLimitMiddleware)  # outermost: an oversized body is refused before anything reads it
#: OpenAI's error shape, for the OpenAPI schema of the /v1 routes.
_V1_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)
}


class ServiceUnavailable(RuntimeError):
    """No deployment can answer (503); ``reason`` is a short label for metrics (timeout, error, ...);
    ``overloaded`` (a deployment's queue is full) is a 429 on the /v1 routes."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class ChunkStream(Protocol):
    """A streaming handle call's chunks (Serve's ``DeploymentResponseGenerator``)."""

    def __anext__(self) -> Any: ...
    def cancel(self) -> None: ...


#: The replica's gateway metrics, for the request-validation handler (which sees no Gateway instance).
_METRICS: list[GatewayMetrics] = []


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if "/v1/" in request.url.path:  # the OpenAI API: a 400 in OpenAI's shape, naming the field
        trace = RequestTrace(current_request_id(), api=_api_label(request.url.path))
        for metrics in _METRICS:
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
    logprobs: bool = False,
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
            cached_tokens=out.cached_tokens,
        ),
        logprobs=[TokenLogprobInfo(token=lp.token, logprob=lp.logprob) for lp in out.logprobs]
        if logprobs
        else None,
        answer_logprob=sum(lp.logprob for lp in out.logprobs) if logprobs else None,
    )


async def _awaitable(response: Any) -> Any:
    return await response


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else ""


def _translated(e: BaseException) -> BadInput | ServiceUnavailable:
    """What a deployment call raised, as the gateway reports it: the request's own fault (a 4xx found where
    the model is), a full queue, or the callee failing (model missing, replica died, bad adapter)."""
    cause = getattr(e, "cause", e)  # a RayTaskError carries what the deployment raised
    if isinstance(cause, BadInput):
        return cause
    # Serve's full handle queue, or the engine's (moe_core.engine.QueueFull, named here: that module
    # imports torch, which the gateway does not)
    if isinstance(cause, BackPressureError) or type(cause).__name__ == "QueueFull":
        return ServiceUnavailable(f"overloaded: {_first_line(cause)}", "overloaded")
    return ServiceUnavailable(f"{type(cause).__name__}: {_first_line(cause)}", "error")


def _api_error(e: ApiError | BadInput | ServiceUnavailable) -> ApiError:
    """Any failure of a /v1 request in OpenAI's terms."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, BadInput):
        return ApiError.of(e)
    if e.reason == "overloaded":
        return ApiError(429, str(e), None, "overloaded")
    return ApiError(503, str(e), None, "timeout" if e.reason == "timeout" else "unavailable")


def _api_label(path: str) -> str:
    """The ``api`` label of a request's metrics."""
    if "/v1/chat/" in path:
        return "chat"
    if "/v1/" in path:
        return "models"
    return "infer"


def _request_id() -> str:
    return current_request_id() or uuid.uuid4().hex


class _Answered:
    """A stream that has nothing after its first chunk (an answer the routing hop gave in place)."""

    async def __anext__(self) -> Chunk:
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


def _whole(answer: Answer) -> Chunk:
    """A whole answer as the one and last chunk of a stream."""
    return Chunk(
        answer.text,
        answer.adapter,
        answer.mode,
        answer.version,
        answer.finish_reason,
        answer.prompt_tokens,
        answer.completion_tokens,
        answer.cached_tokens,
        answer.logprobs,
    )


@dataclasses.dataclass(frozen=True)
class _Route:
    """Who answers a chat request, and how that was decided."""

    adapter: str | None
    target: Target
    via: RoutedVia
    confidence: float | None = None
    answer: Answer | None = None  # the routing hop's answer, when it answered in place


class Gateway:
    """The gateway's logic; :data:`GatewayIngress` is this class bound to the FastAPI app for Serve
    (kept apart so the logic is unit-tested without Serve, on fake deployment handles)."""

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
        _METRICS[:] = [self.metrics]
        set_body_limit(settings.limits.max_body_bytes)
        set_api_keys(ApiKeys.of(settings.api))  # refuses to start when keys are on and none is found
        on_refused(self._refused)

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
        from moe_core.storage import Storage

        assert self.controller is not None
        store = Storage.from_config(self.settings.storage)
        while True:
            counts, self._counts = dict(self._counts), Counter()
            try:
                await asyncio.wait_for(_awaitable(self.controller.report.remote(counts)), 5.0)
            except Exception as e:  # the controller restarting: these counts are lost, routing goes on
                logger.warning("gateway: promotion controller did not take the counts (%s)", _first_line(e))
            try:
                assignments = await asyncio.to_thread(read_assignments, store, len(self.slots))
                self._route_promoted({a: k for a, k in assignments.routed().items() if a not in self.merged})
            except Exception as e:  # storage unreadable: keep routing as before
                logger.warning("gateway: promotion assignments unreadable (%s)", _first_line(e))
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

    def _query(self, req: InferRequest, trace: RequestTrace) -> tuple[Query, ImagePlan]:
        """Decode and check the image; resolve the pixels the model sees of it and what they cost in tokens."""
        limits = self.settings.limits
        data, img = decode_image(
            req.image_b64,
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
        sampling = Sampling(
            constraint=constraint, expert_grammar=constraint is None, logprobs=0 if req.logprobs else None
        )
        return Query(data, req.prompt, bounds, image.tokens, trace.request_id, sampling), image

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
        out, fallback = await self._generate(policy, adapter, target, query, trace)
        logprobs = query.sampling.logprobs is not None
        return _response(out, image, via, confidence, trace, fallback=fallback, logprobs=logprobs)

    async def _generate(
        self, policy: RoutingPolicy, adapter: str | None, target: Target, query: Query, trace: RequestTrace
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
            raise _translated(e) from e

    # ------------------------------------------------------------ OpenAI API
    @api.get("/v1/models", response_model=ModelList, responses=_V1_ERRORS)
    async def list_models(self) -> Any:
        """The base model, every expert adapter and the routed model (OpenAI's model list)."""
        try:
            policy = self.policy
        except ServiceUnavailable as e:
            return _api_error(e).response()
        return model_list(policy, self.settings, self._routing(policy), int(self.started_at))

    @api.get("/v1/models/{model:path}", response_model=ModelCard, responses=_V1_ERRORS)
    async def retrieve_model(self, model: str) -> Any:
        try:
            policy = self.policy
            resolve_model(model, policy, self.settings, self._routing(policy))
        except (ApiError, ServiceUnavailable) as e:
            return _api_error(e).response()
        cards = model_list(policy, self.settings, self._routing(policy), int(self.started_at)).data
        return next(c for c in cards if c.id == model)

    @api.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses=_V1_ERRORS | {200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(self, req: ChatCompletionRequest) -> Any:
        """OpenAI's chat completion: streamed as Server-Sent Events with ``stream: true``."""
        trace = RequestTrace(_request_id(), api="chat")
        try:
            if req.stream:
                return await self._chat_stream(req, trace)  # the stream records its own metrics
            response: Any = await self._chat(req, trace)
            status = 200
        except (ApiError, BadInput, ServiceUnavailable) as e:
            err = _api_error(e)
            status, response = err.status, err.response()
        self.metrics.record(trace, status)
        return response

    def _routing(self, policy: RoutingPolicy) -> bool:
        return routing_available(policy, self.settings, self.dynamic is not None)

    async def _conversation(
        self, req: ChatCompletionRequest, trace: RequestTrace
    ) -> tuple[RoutingPolicy, ModelChoice, Conversation]:
        """Check the request, resolve its model and convert its messages (images decoded once, here)."""
        check_request(req)
        policy = self.policy  # one snapshot per request, even across a reconfigure
        choice = resolve_model(req.model, policy, self.settings, self._routing(policy))
        trace.adapter = choice.adapter or "none"
        conv = await build_conversation(
            req, self.settings, trace.request_id, needs_image=choice.kind == "routed"
        )
        trace.pixels = sum(p.width * p.height for p in conv.images)
        trace.image_tokens = conv.query.image_tokens
        return policy, choice, conv

    async def _decide(
        self,
        policy: RoutingPolicy,
        choice: ModelChoice,
        query: Query,
        prefer_merged: bool | None,
        trace: RequestTrace,
        stream: bool,
    ) -> _Route:
        """Who answers: the named adapter, the base model, or the routing adapter's choice."""
        if choice.kind == "adapter":
            trace.routed_via = "explicit"
            return _Route(choice.adapter, policy.target(choice.adapter, prefer_merged), "explicit")
        if choice.kind == "base":
            trace.routed_via = "explicit"
            return _Route(None, "dynamic", "explicit")
        trace.routed_via = "router"
        routed = await self._route(policy, query, prefer_merged, trace, answer_in_place=not stream)
        d = routed.decision
        return _Route(d.adapter, d.target, d.routed_via, d.classification.confidence, routed.answer)

    def _info(
        self, trace: RequestTrace, route: _Route, conv: Conversation, out: Answer | Chunk, fallback: bool
    ) -> MoeInfo:
        """The ``moe`` object, and the trace's record of who answered."""
        trace.adapter = out.adapter or "base"
        trace.mode = out.mode if out.adapter else "base"
        return MoeInfo(
            request_id=trace.request_id,
            adapter=out.adapter,
            mode=out.mode,
            routed_via=route.via,
            confidence=route.confidence,
            fallback=fallback,
            merged_version=out.version if out.mode == "merged" else None,
            images=conv.image_info,
        )

    async def _chat(self, req: ChatCompletionRequest, trace: RequestTrace) -> JSONResponse:
        policy, choice, conv = await self._conversation(req, trace)
        route = await self._decide(policy, choice, conv.query, req.prefer_merged, trace, stream=False)
        out, fallback = route.answer, False
        if out is not None:
            self._served(route.adapter)  # answered where it was routed: it counts for promotion too
        if out is None:
            out, fallback = await self._generate(policy, route.adapter, route.target, conv.query, trace)
        info = self._info(trace, route, conv, out, fallback)
        trace.prompt_tokens, trace.completion_tokens = out.prompt_tokens, out.completion_tokens
        usage = CompletionUsage.of(
            out.prompt_tokens, out.completion_tokens, out.cached_tokens, conv.query.image_tokens
        )
        text, calls = out.text, list[ToolCall]()
        if calls_tools(req):  # the model's <tool_call> blocks as tool calls; anything malformed stays text
            parser = ToolCallParser([t.function.name for t in req.tools or ()])
            parts = parser.feed(out.text) + parser.end()
            text = "".join(p for p in parts if isinstance(p, str))
            calls = [p for p in parts if isinstance(p, ToolCall)]
        logprobs = out.logprobs if req.logprobs else None
        body = chat_completion(
            req.model, text, out.finish_reason, usage, info, calls=calls, logprobs=logprobs
        )
        return JSONResponse(body.model_dump(mode="json", exclude_none=False), headers=moe_headers(info))

    async def _chat_stream(self, req: ChatCompletionRequest, trace: RequestTrace) -> StreamingResponse:
        """Route, then wait for the first chunk (a failure until then is an ordinary error response, and
        a merged deployment down by then falls back); the rest streams as Server-Sent Events."""
        policy, choice, conv = await self._conversation(req, trace)
        route = await self._decide(policy, choice, conv.query, req.prefer_merged, trace, stream=True)
        t0 = time.perf_counter()
        if route.answer is not None:  # the routing hop answered in place: one chunk
            self._served(route.adapter)
            stream: ChunkStream = _Answered()
            first, fallback = _whole(route.answer), False
        else:
            stream, first, fallback = await self._open_stream(policy, route, conv.query, trace)
        info = self._info(trace, route, conv, first, fallback)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writer = ChunkWriter(completion_id(trace.request_id), int(time.time()), req.model, include_usage)
        parser = ToolCallParser([t.function.name for t in req.tools or ()]) if calls_tools(req) else None
        events = self._events(writer, info, first, stream, trace, t0, parser, conv.query.image_tokens)
        headers = moe_headers(info) | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _open_stream(
        self, policy: RoutingPolicy, route: _Route, query: Query, trace: RequestTrace
    ) -> tuple[ChunkStream, Chunk, bool]:
        """Start streaming from the route's target: the stream, its first chunk, and whether it fell back."""
        adapter = route.adapter
        self._served(adapter)
        if route.target == "merged":
            assert adapter is not None
            try:
                handle = self._merged_handle(adapter).options(stream=True)
                return (*await self._first(handle.stream.remote(query, adapter)), False)
            except ServiceUnavailable as e:  # nothing was sent yet: answered once, by dynamic
                dynamic = self._fall_back(policy, adapter, query, e, trace)
                return (*await self._first(dynamic.options(stream=True).stream.remote(query, adapter)), True)
        handle = self._dynamic(adapter).options(stream=True)
        return (*await self._first(handle.stream.remote(query, adapter)), False)

    async def _first(self, response: Any) -> tuple[ChunkStream, Chunk]:
        """A streaming call (``handle.options(stream=True).stream.remote(...)``) and its first chunk."""
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
            raise _translated(e) from e

    async def _events(
        self,
        writer: ChunkWriter,
        info: MoeInfo,
        first: Chunk,
        stream: ChunkStream,
        trace: RequestTrace,
        started: float,
        parser: ToolCallParser | None = None,
        image_tokens: int = 0,
    ) -> AsyncIterator[str]:
        """The Server-Sent Events of one answer: role, text and tool-call deltas, finish reason, usage,
        ``[DONE]``; an error after the first chunk is an error event before ``[DONE]`` (the answer is
        never restarted). With ``parser``, tool calls are sent as OpenAI's tool-call deltas as each
        closes; logprobs ride on the next event sent after their tokens."""
        status, chunk, done = 500, first, False
        held: list[TokenLogprob] = []
        try:
            yield writer.role(info)
            while True:
                held += chunk.logprobs
                pieces: list[str | ToolCall] = [chunk.text] if parser is None else parser.feed(chunk.text)
                if chunk.finish_reason is not None and parser is not None:
                    pieces += parser.end()
                for piece in pieces:
                    if isinstance(piece, ToolCall):
                        yield writer.tool_call(parser.calls_sent if parser else 0, piece, held or None)
                        if parser is not None:
                            parser.calls_sent += 1
                    elif piece:
                        yield writer.content(piece, held or None)
                    else:
                        continue
                    held = []
                trace.prompt_tokens, trace.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                if chunk.finish_reason is not None:
                    done = True
                    break
                nxt = await self._next(stream)
                if nxt is None:
                    raise ServiceUnavailable("the stream ended without a finish reason")
                chunk = nxt
            calls = parser is not None and parser.calls_sent > 0
            yield writer.finish(
                "tool_calls" if calls and chunk.finish_reason == "stop" else chunk.finish_reason, held
            )
            if writer.include_usage:
                usage = CompletionUsage.of(
                    chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens, image_tokens
                )
                yield writer.usage(usage)
            status = 200
        except (BadInput, ServiceUnavailable) as e:
            err = _api_error(e)
            status = err.status
            logger.warning("gateway: %s: stream failed after its first chunk: %s", trace.request_id, e)
            yield writer.error(err)
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        finally:
            if not done:
                stream.cancel()  # never left generating for nobody
            trace.answer_s = time.perf_counter() - started
            self.metrics.record(trace, status)
        yield DONE

    def _refused(self, path: str, status: int) -> None:
        """Count a request the API-key middleware refused."""
        self.metrics.record(RequestTrace(current_request_id(), api=_api_label(path)), status)

    def check_health(self) -> None:
        """Unhealthy until the live settings arrive (a Serve config without user_config shows here)."""
        _ = self.policy

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
            from moe_core.storage import Storage

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
