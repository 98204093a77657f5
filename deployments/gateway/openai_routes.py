"""The OpenAI-compatible routes (``/v1/models``, ``/v1/chat/completions``, streamed or not): a chat request
is read (:mod:`deployments.openai_api.conversation`), made a query by the gateway's pipeline
(:mod:`deployments.gateway.pipeline`), answered through the dispatcher (:mod:`deployments.gateway.dispatch`)
and shaped as OpenAI's answer or its Server-Sent Events (:mod:`deployments.openai_api.responses`,
:mod:`deployments.openai_api.stream`)."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from deployments.gateway.api import V1_ERRORS, api
from deployments.gateway.core import logger
from deployments.gateway.dispatch import ChunkStream, Dispatcher, Route
from deployments.gateway.errors import ServiceUnavailable, api_error
from deployments.gateway.pipeline import Intake, ParsedRequest, take
from deployments.messages import Answer, Chunk, TokenLogprob
from deployments.observability import RequestTrace, current_request_id
from deployments.openai_api.conversation import Conversation, build_conversation
from deployments.openai_api.errors import ApiError
from deployments.openai_api.models import (
    ModelCard,
    ModelChoice,
    ModelList,
    model_list,
    resolve_model,
    routing_available,
)
from deployments.openai_api.request import ChatCompletionRequest, calls_tools, check_request, sampling_of
from deployments.openai_api.responses import (
    ChatCompletion,
    CompletionUsage,
    MoeInfo,
    chat_completion,
    completion_id,
    moe_headers,
)
from deployments.openai_api.stream import DONE, ChunkWriter
from deployments.openai_api.tool_calls import ToolCall, ToolCallParser
from deployments.routing import RoutingPolicy
from deployments.schemas import BadInput
from deployments.settings import GatewaySettings

__all__ = ["OpenAIRoutes"]


def _request_id() -> str:
    return current_request_id() or uuid.uuid4().hex


def chat_request(req: ChatCompletionRequest, conv: Conversation, settings: GatewaySettings) -> ParsedRequest:
    """A chat request in the pipeline's terms: its messages read, its sampling and pixel bounds."""
    return ParsedRequest(
        conv.prompt,
        conv.images,
        "messages",
        conv.chars,
        "messages",
        sampling_of(req, settings.limits.max_completion_tokens),
        req.min_pixels,
        req.max_pixels,
        conv.turns,
        conv.tools,
    )


class OpenAIRoutes(Dispatcher):
    """The ``/v1`` API of :class:`deployments.gateway.service.Gateway`."""

    @api.get("/v1/models", response_model=ModelList, responses=V1_ERRORS)
    async def list_models(self) -> Any:
        """The base model, every expert adapter and the routed model (OpenAI's model list)."""
        try:
            policy = self.policy
        except ServiceUnavailable as e:
            return api_error(e).response()
        return model_list(policy, self.settings, self._routing(policy), int(self.started_at))

    @api.get("/v1/models/{model:path}", response_model=ModelCard, responses=V1_ERRORS)
    async def retrieve_model(self, model: str) -> Any:
        try:
            policy = self.policy
            resolve_model(model, policy, self.settings, self._routing(policy))
        except (ApiError, ServiceUnavailable) as e:
            return api_error(e).response()
        cards = model_list(policy, self.settings, self._routing(policy), int(self.started_at)).data
        return next(c for c in cards if c.id == model)

    @api.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses=V1_ERRORS | {200: {"content": {"text/event-stream": {}}}},
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
            err = api_error(e)
            status, response = err.status, err.response()
        self.metrics.record(trace, status)
        return response

    def _routing(self, policy: RoutingPolicy) -> bool:
        return routing_available(policy, self.settings, self.dynamic is not None)

    async def _intake(
        self, req: ChatCompletionRequest, trace: RequestTrace
    ) -> tuple[RoutingPolicy, ModelChoice, Intake]:
        """Check the request, resolve its model, read its messages and make them the query."""
        check_request(req)
        policy = self.policy  # one snapshot per request, even across a reconfigure
        choice = resolve_model(req.model, policy, self.settings, self._routing(policy))
        trace.adapter = choice.adapter or "none"
        settings = self.settings.for_model(choice.adapter)  # a further model's own limits
        conv = await build_conversation(
            req, settings.api, settings.limits.max_image_bytes, needs_image=choice.kind == "routed"
        )
        return policy, choice, await take(chat_request(req, conv, settings), settings, trace)

    def _info(
        self, trace: RequestTrace, route: Route, taken: Intake, out: Answer | Chunk, fallback: bool
    ) -> MoeInfo:
        """The ``moe`` object, and the trace's record of who answered."""
        trace.answered(out.adapter, out.mode)
        return MoeInfo(
            request_id=trace.request_id,
            adapter=out.adapter,
            mode=out.mode,
            routed_via=route.via,
            confidence=route.confidence,
            fallback=fallback,
            merged_version=out.version if out.mode == "merged" else None,
            images=taken.image_info,
        )

    async def _chat(self, req: ChatCompletionRequest, trace: RequestTrace) -> JSONResponse:
        policy, choice, taken = await self._intake(req, trace)
        route = await self._decide(policy, choice, taken.query, req.prefer_merged, trace, whole=True)
        out, fallback = await self._answer(policy, route, taken.query, trace)
        info = self._info(trace, route, taken, out, fallback)
        trace.prompt_tokens, trace.completion_tokens = out.prompt_tokens, out.completion_tokens
        usage = CompletionUsage.of(
            out.prompt_tokens, out.completion_tokens, out.cached_tokens, taken.query.image_tokens
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
        policy, choice, taken = await self._intake(req, trace)
        route = await self._decide(policy, choice, taken.query, req.prefer_merged, trace, whole=False)
        t0 = time.perf_counter()
        stream, first, fallback = await self._stream(policy, route, taken.query, trace)
        info = self._info(trace, route, taken, first, fallback)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writer = ChunkWriter(completion_id(trace.request_id), int(time.time()), req.model, include_usage)
        parser = ToolCallParser([t.function.name for t in req.tools or ()]) if calls_tools(req) else None
        events = self._events(writer, info, first, stream, trace, t0, parser, taken.query.image_tokens)
        headers = moe_headers(info) | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

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
            err = api_error(e)
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
