"""The OpenAI-compatible API's side of the gateway: request and response models, model names, the
conversion of chat messages to a :class:`Query`, OpenAI's error shape, Server-Sent Events and API keys.

No Ray and no model here: the gateway (:mod:`deployments.gateway`) serves the routes and carries out the
calls; everything it needs to speak OpenAI is a value or a pure function of this module, unit-tested on
its own.

What a client sees beyond OpenAI's schema (a plain OpenAI client ignores it):

- ``moe`` in each ``chat.completion`` and in the first ``chat.completion.chunk``: :class:`MoeInfo`
  (request id, adapter, mode, routed_via, confidence, fallback, merged_version, and the size the model saw
  each image at, to map an action's coordinates back to the screenshot).
- Response headers: ``X-Moe-Adapter`` (absent when the base model answered), ``X-Moe-Mode``,
  ``X-Moe-Routed-Via``, ``X-Moe-Fallback``, ``X-Moe-Confidence`` (routed requests) and
  ``X-Moe-Merged-Version`` (merged answers), beside Serve's ``X-Request-Id``.
- Extension fields of a chat request, as ``/infer`` has them: ``prefer_merged``, ``min_pixels``,
  ``max_pixels``; and vLLM's: ``structured_outputs`` (and ``guided_*``), ``top_k``, ``min_tokens``,
  ``ignore_eos``, ``repetition_penalty``. vLLM's other sampling extras are refused with a 400 naming
  them, never ignored.
- ``usage.prompt_tokens_details``: ``cached_tokens`` (prompt tokens served from the prefix cache) and
  ``image_tokens``.

Structured outputs (:mod:`deployments.outputs`) and tool calls (:mod:`deployments.tool_calls`) are read
here into the query's constraint; a tool call the model writes is parsed back by the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.messages import FinishReason, Query, Sampling, TokenLogprob, Turn
from deployments.outputs import StructuredFields, constraint_of
from deployments.routing import RoutedVia, RoutingPolicy
from deployments.schemas import BadInput, ImageInfo, Mode, error_body, verify_image
from deployments.settings import GatewaySettings
from deployments.tool_calls import NamedToolChoice, Tool, ToolCall, ToolCallIn, tool_constraint, tools_json
from moe_core.config import ApiConfig, ConfigError
from moe_core.vision import ImagePlan, PixelBounds, plan

__all__ = [
    "DONE",
    "ApiError",
    "ApiKeyMiddleware",
    "ApiKeys",
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChunkWriter",
    "Conversation",
    "ErrorResponse",
    "ModelCard",
    "ModelChoice",
    "ModelList",
    "MoeInfo",
    "build_conversation",
    "chat_completion",
    "check_request",
    "model_list",
    "moe_headers",
    "public_storage_root",
    "resolve_model",
    "set_api_keys",
    "validation_error",
]

logger = logging.getLogger(__name__)

OWNED_BY = "moe-inference-server"
#: The end of every stream, after the last chunk (or after an error object).
DONE = "data: [DONE]\n\n"
#: The ``seed`` range OpenAI documents (a signed 64-bit integer).
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_STOP = 16
#: Paths that never need a key: liveness and the API's own description.
OPEN_PATHS = frozenset(
    {"/healthz", "/health", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
_DATA_IMAGE = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


# ----------------------------------------------------------------------------- errors
_ERROR_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}
#: /infer's field names, as the OpenAI request names what they stand for.
_PARAMS = {"expert": "model", "image_b64": "messages", "prompt": "messages"}


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, naming the field.")
    type: str = Field(
        description="invalid_request_error, rate_limit_error or server_error, as OpenAI has them."
    )
    param: str | None = Field(description="The request field at fault (dotted path), when one is.")
    code: str | None = Field(description="A short machine-readable reason, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    """OpenAI's error shape, on every /v1 error status and as the error event of a stream."""

    error: ErrorDetail


class ApiError(Exception):
    """A /v1 request that cannot be answered: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def of(cls, e: BadInput) -> ApiError:
        """A :class:`BadInput` from the shared code (routing, deployments): its field as a /v1 param."""
        param = _PARAMS.get(e.field, e.field)
        code = {404: "model_not_found" if param == "model" else "not_found", 413: "too_large"}.get(
            e.status, "invalid_value"
        )
        if e.status == 422 and e.field == "expert" and "below" in e.message:
            code = "below_confidence_threshold"
        return cls(e.status, e.message, param, code)

    @property
    def detail(self) -> ErrorDetail:
        kind = _ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code)

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.detail).model_dump(mode="json")

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=dict(headers or {}))


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as a dotted request path, without its union-member labels."""
    parts: list[str] = []
    for x in loc:
        s = str(x)
        if x == "body" and not parts:
            continue
        if isinstance(x, str) and ("[" in s or s[:1].isupper() or s in {"str", "int", "float", "bool"}):
            continue  # a union member's label (``str``, ``list[tagged-union[...]]``, ``ImageURL``)
        if parts and parts[-1] == s:
            continue  # a tagged union repeats the tag (``image_url.image_url``)
        parts.append(s)
    return ".".join(parts) or None


def validation_error(errors: list[Any]) -> ApiError:
    """FastAPI's request-validation errors as one 400 naming the most specific field, as OpenAI does."""
    if not errors:
        return ApiError(400, "invalid request", None, "invalid_request")
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    located = [(_param(tuple(e.get("loc", ()))), e) for e in errors]
    param = max((p for p, _ in located), key=lambda p: len(p.split(".")) if p else 0)
    msgs = list(dict.fromkeys(str(e.get("msg", "")) for p, e in located if p == param))
    kind = next(str(e.get("type", "")) for p, e in located if p == param)
    code = "missing" if kind == "missing" else "invalid_type" if kind.endswith("_type") else "invalid_value"
    return ApiError(400, f"{param or 'body'}: {', or '.join(msgs)}", param, code)


# ----------------------------------------------------------------------------- requests
class _Lenient(BaseModel):
    """OpenAI's request objects: unknown fields are ignored, types are checked strictly (no coercion)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str = Field(description="Text of the message.")


class ImageURL(_Lenient):
    url: str = Field(
        description="A data URL (data:image/png;base64,...); http(s) URLs only from the hosts in "
        "api.image_url_hosts."
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        default=None, description="Accepted and ignored: min_pixels/max_pixels set the detail."
    )


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL | str = Field(description="The image: {url: ...} (a bare URL string is accepted).")

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is read as system; tool: a function's result (after the assistant's call)."
    )
    content: str | list[ContentPart] | None = Field(
        default=None, description="Text, or parts: text and (user messages only) image_url."
    )
    name: str | None = Field(default=None, description="Accepted and ignored.")
    tool_calls: list[ToolCallIn] | None = Field(
        default=None, description="An assistant's calls, sent back in the history."
    )
    tool_call_id: str | None = Field(default=None, description="A tool message: the call it answers.")


class StreamOptions(_Lenient):
    include_usage: bool | None = Field(
        default=None, description="Send a last chunk with the usage (choices empty) before [DONE]."
    )


#: vLLM's sampling extras this server does not do, and the value that means "not asked": any other is a 400.
UNSUPPORTED: dict[str, Any] = {
    "logit_bias": None,
    "min_p": 0.0,
    "best_of": 1,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "stop_token_ids": None,
    "prompt_logprobs": None,
    "include_stop_str_in_output": False,
    "echo": False,
}


class ChatCompletionRequest(_Lenient, StructuredFields):
    """OpenAI's chat completion request, as the official SDK sends it; unknown fields are ignored, but
    vLLM's sampling extras are honoured or refused (:data:`UNSUPPORTED`)."""

    model: str = Field(
        description="An expert adapter's name, the base model's id, or the routed model (auto)."
    )
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (capped by the server)."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Same as max_tokens; wins over it."
    )
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="Sampling temperature; default 0 (greedy, as /infer)."
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling; default 1.")
    seed: int | None = Field(
        default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Same seed, same sampled text."
    )
    stop: str | list[str] | None = Field(default=None, description="Generation ends before any of these.")
    n: int | None = Field(default=None, description="Choices to generate: only 1 is supported.")
    stream: bool | None = Field(default=None, description="Answer as Server-Sent Events.")
    stream_options: StreamOptions | None = Field(default=None, description="With stream: include_usage.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    logprobs: bool | None = Field(default=None, description="Return the chosen tokens' log probabilities.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="With logprobs: the most likely tokens at each place (0-20)."
    )
    tools: list[Tool] | None = Field(default=None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="none, auto (the default with tools), required, or {type: function, function: {name}}; "
        "required and a named function are enforced by a grammar.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="With required: false allows exactly one call."
    )
    top_k: int | None = Field(
        default=None, ge=-1, description="vLLM's: sample among the k most likely (-1, 0: off)."
    )
    min_tokens: int | None = Field(
        default=None, ge=0, description="vLLM's: no end of sequence before this many."
    )
    ignore_eos: bool | None = Field(
        default=None, description="vLLM's: never stop at the end of sequence (generate max_tokens)."
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0.0,
        le=2.0,
        description="vLLM's: > 1 discourages tokens already in prompt and answer.",
    )
    presence_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, description="OpenAI's presence penalty."
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, description="OpenAI's frequency penalty."
    )
    logit_bias: dict[str, Any] | None = Field(default=None, description="Not supported: refused when given.")
    min_p: float | None = Field(default=None, description="vLLM's; not supported: refused unless 0.")
    best_of: int | None = Field(default=None, description="vLLM's; not supported: refused unless 1.")
    use_beam_search: bool | None = Field(
        default=None, description="vLLM's; not supported: refused when true."
    )
    length_penalty: float | None = Field(default=None, description="vLLM's; not supported: refused unless 1.")
    stop_token_ids: list[int] | None = Field(default=None, description="vLLM's; not supported: refused.")
    prompt_logprobs: int | None = Field(default=None, description="vLLM's; not supported: refused.")
    include_stop_str_in_output: bool | None = Field(default=None, description="vLLM's; refused when true.")
    echo: bool | None = Field(default=None, description="vLLM's; refused when true.")
    prefer_merged: bool | None = Field(
        default=None, description="Extension, as /infer: override gateway.prefer_merged for this request."
    )
    min_pixels: int | None = Field(
        default=None, gt=0, description="Extension, as /infer: Qwen's per-image min_pixels for every image."
    )
    max_pixels: int | None = Field(
        default=None, gt=0, description="Extension, as /infer: Qwen's per-image max_pixels for every image."
    )


def check_request(req: ChatCompletionRequest) -> None:
    """What the schema cannot say: n=1 only, stream_options only with stream, no unsupported features."""
    if req.n is not None and req.n != 1:
        raise ApiError(400, f"n: only n=1 is supported (got {req.n})", "n", "unsupported_value")
    if req.stream_options is not None and not req.stream:
        raise ApiError(
            400, "stream_options: only allowed with stream: true", "stream_options", "invalid_value"
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs", "invalid_value")
    for name, default in UNSUPPORTED.items():
        value = getattr(req, name)
        if value is not None and value != default and value not in ({}, []):
            raise ApiError(
                400, f"{name}: not supported by this server (got {value!r})", name, "unsupported_value"
            )
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop", "invalid_value")


def sampling_of(req: ChatCompletionRequest, max_completion_tokens: int) -> Sampling:
    """The request's sampling (temperature 0, greedy, unless asked); asking for more tokens than the
    server's ``limits.max_completion_tokens`` is a 400 naming the field (none asked: the engine's
    ``limits.max_new_tokens``)."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is not None and asked > max_completion_tokens:
        raise ApiError(
            400,
            f"{param}: {asked} is over this server's limit of {max_completion_tokens} tokens",
            param,
            "invalid_value",
        )
    if req.min_tokens and asked is not None and req.min_tokens > asked:
        raise ApiError(
            400, f"min_tokens: {req.min_tokens} is over {param} {asked}", "min_tokens", "invalid_value"
        )
    try:
        constraint = constraint_of(req)
        tools = tool_constraint(req.tools, req.tool_choice, req.parallel_tool_calls)
    except BadInput as e:
        raise ApiError.of(e) from e
    if constraint is not None and tools is not None:
        raise ApiError(
            400,
            f"tool_choice: {req.tool_choice!r} and {constraint.param.split('.')[0]} both constrain the answer",
            "tool_choice",
            "invalid_value",
        )
    return Sampling(
        max_tokens=asked,
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
        top_k=max(0, req.top_k or 0),
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        constraint=constraint or tools,
        expert_grammar=constraint is None and tools is None and not calls_tools(req),
    )


def calls_tools(req: ChatCompletionRequest) -> bool:
    """The model may answer with tool calls (tools given, tool_choice not none): they are parsed back."""
    return bool(req.tools) and req.tool_choice != "none"


# ----------------------------------------------------------------------------- models
class ModelCard(BaseModel):
    """One model of ``/v1/models``: the base, an expert adapter (parent: the base), or the routed model."""

    id: str = Field(description="What to send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the gateway started serving it.")
    owned_by: str = OWNED_BY
    root: str = Field(
        description="Where it comes from: the base model's id, or the adapter's storage folder."
    )
    parent: str | None = Field(
        default=None, description="The base model's id, for adapters and the routed model."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class ModelChoice:
    """What a request's ``model`` names: an expert adapter, the bare base model, or routing."""

    kind: Literal["adapter", "base", "routed"]
    adapter: str | None = None


def routing_available(policy: RoutingPolicy, settings: GatewaySettings, dynamic: bool) -> bool:
    """The routed model exists when a routing adapter, its labels and the dynamic deployment do."""
    return dynamic and settings.router is not None and bool(policy.labels)


def public_storage_root(url: str) -> str:
    """The storage root as clients see it: a URL's scheme only (``s3://<storage>``: the bucket and
    prefix are the operator's, not the API's), a path as it is configured."""
    scheme, sep, _ = url.partition("://")
    return f"{scheme}://<storage>" if sep else url.rstrip("/")


def model_list(policy: RoutingPolicy, settings: GatewaySettings, routed: bool, created: int) -> ModelList:
    """The base, every expert the live policy serves (adapters published later appear as the live
    config names them), and the routed model when routing is available."""
    base = settings.base_model_name
    root = public_storage_root(settings.storage.url)
    cards = [ModelCard(id=base, created=created, root=settings.base_model_id)]
    cards += [
        ModelCard(id=name, created=created, root=f"{root}/experts/{name}", parent=base)
        for name in sorted(policy.experts)
    ]
    if routed:
        cards.append(
            ModelCard(
                id=settings.api.routed_model_name,
                created=created,
                root=f"{root}/router/{settings.router}",
                parent=base,
            )
        )
    return ModelList(data=cards)


def resolve_model(model: str, policy: RoutingPolicy, settings: GatewaySettings, routed: bool) -> ModelChoice:
    """``model`` to what answers; an unknown name is a 404 listing the known ones."""
    if model == settings.api.routed_model_name and routed:
        return ModelChoice("routed")
    if model == settings.base_model_name:
        return ModelChoice("base")
    if model in policy.experts:
        return ModelChoice("adapter", model)
    known = [c.id for c in model_list(policy, settings, routed, 0).data]
    raise ApiError(404, f"model {model[:80]!r} does not exist; known: {known}", "model", "model_not_found")


# ----------------------------------------------------------------------------- messages -> Query
#: Fetches an allowed image URL: (url, max_bytes, timeout_s) -> the file's bytes.
Fetcher = Callable[[str, int, float], Awaitable[bytes]]


@dataclass(frozen=True)
class Conversation:
    """A chat request as the model deployments get it, and what the model sees of each image."""

    query: Query
    images: tuple[ImagePlan, ...]

    @property
    def image_info(self) -> list[ImageInfo]:
        return [
            ImageInfo(
                width=p.width,
                height=p.height,
                model_width=p.model_width,
                model_height=p.model_height,
                tokens=p.tokens,
            )
            for p in self.images
        ]


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` is named in ``allowed``, exactly or under a ``*.domain`` wildcard."""
    host = host.lower().rstrip(".")
    for a in allowed:
        if a.startswith("*.") and host.endswith(a[1:]) and host != a[2:]:
            return True
        if host == a:
            return True
    return False


async def fetch_url(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET an image from an allowed host: no redirects, at most ``max_bytes``, within ``timeout_s``."""
    import requests

    def get() -> bytes:
        deadline = time.monotonic() + timeout_s
        with requests.get(url, stream=True, timeout=timeout_s, allow_redirects=False) as r:
            if r.status_code != 200:
                raise ValueError(f"HTTP {r.status_code} (redirects are not followed)")
            size = int(r.headers.get("content-length") or 0)
            if size > max_bytes:
                raise OverflowError(f"image is {size} bytes, larger than {max_bytes}")
            data = bytearray()
            for block in r.iter_content(64 * 1024):
                data += block
                if len(data) > max_bytes:
                    raise OverflowError(f"image is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not fetched within {timeout_s:g}s")
            return bytes(data)

    return await asyncio.wait_for(asyncio.to_thread(get), timeout_s + 1.0)


async def _image_bytes(url: str, param: str, api: ApiConfig, max_bytes: int, fetch: Fetcher) -> bytes:
    """A data URL's bytes, or an allowed host's image; anything else is a 400 naming ``param``."""
    if url.startswith("data:"):
        if not _DATA_IMAGE.match(url):
            raise ApiError(400, f"{param}: expected data:image/<type>;base64,...", param, "invalid_image_url")
        b64 = url.split(",", 1)[1]
        if len(b64) > (max_bytes * 4) // 3 + 8:
            raise ApiError(413, f"{param}: image is larger than {max_bytes} bytes", param, "too_large")
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{param}: not valid base64: {e}", param, "invalid_image") from e
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{param}: expected a data: URL (or an http(s) URL)", param, "invalid_image_url")
    if not host_allowed(parts.hostname, api.image_url_hosts):
        raise ApiError(
            400,
            f"{param}: image URLs from {parts.hostname!r} are not fetched; send the image as a data URL "
            "(data:image/png;base64,...)"
            + ("" if not api.image_url_hosts else f" or from an allowed host {api.image_url_hosts}"),
            param,
            "image_url_not_allowed",
        )
    try:
        return await fetch(url, max_bytes, api.image_fetch_timeout_s)
    except OverflowError as e:
        raise ApiError(413, f"{param}: {e}", param, "too_large") from e
    except (TimeoutError, ValueError, OSError) as e:
        raise ApiError(400, f"{param}: could not fetch the image: {e}", param, "image_fetch_failed") from e
    except Exception as e:  # requests' own errors (connection refused, bad URL, ...)
        raise ApiError(400, f"{param}: could not fetch the image: {e}", param, "image_fetch_failed") from e


def _parts(message: ChatMessage) -> list[TextPart | ImagePart]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [TextPart(type="text", text=message.content)]
    return list(message.content)


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate parses from JSON but is not text
        raise ApiError(
            400, f"{param}: not valid unicode ({e.reason} at position {e.start})", param, "invalid_value"
        ) from e


def _bounds(req: ChatCompletionRequest, settings: GatewaySettings) -> PixelBounds:
    limits = settings.limits
    try:
        return PixelBounds(limits.min_pixels, limits.max_pixels).narrowed(req.min_pixels, req.max_pixels)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), field, "invalid_value") from e


async def build_conversation(
    req: ChatCompletionRequest,
    settings: GatewaySettings,
    request_id: str,
    *,
    needs_image: bool = False,
    fetch: Fetcher = fetch_url,
) -> Conversation:
    """The messages as a :class:`Query`: checked, images decoded and verified, their tokens planned.

    One user message holding a screenshot and then text is the ``/infer`` request (``turns`` empty, so
    the engine adds the configured system prompt, as for ``/infer``); anything else is sent whole as
    ``turns``. ``image`` is the conversation's last image (what the routing adapter classifies), and
    ``prompt`` the last user message's text.
    """
    api, limits = settings.api, settings.limits
    contents = [_parts(m) for m in req.messages]
    count = sum(isinstance(p, ImagePart) for parts in contents for p in parts)
    chars = sum(len(p.text) for parts in contents for p in parts if isinstance(p, TextPart))
    if chars > limits.max_prompt_chars:
        raise ApiError(
            413,
            f"messages: {chars} characters of text, over the limit of {limits.max_prompt_chars}",
            "messages",
            "too_large",
        )
    if count > api.max_images:
        raise ApiError(
            400,
            f"messages: {count} images, over the limit of {api.max_images}",
            "messages",
            "too_many_images",
        )
    if needs_image and count == 0:
        raise ApiError(
            400,
            f"messages: model {api.routed_model_name!r} routes on a screenshot, and the conversation has none; "
            "send an image or name a model",
            "messages",
            "image_required",
        )
    if not any(m.role == "user" for m in req.messages):
        raise ApiError(400, "messages: at least one user message is required", "messages", "invalid_value")
    bounds = _bounds(req, settings)
    turns: list[Turn] = []
    images: list[bytes] = []
    plans: list[ImagePlan] = []
    prompt = ""
    for i, (message, parts) in enumerate(zip(req.messages, contents, strict=True)):
        role: Literal["system", "user", "assistant", "tool"] = (
            "system" if message.role == "developer" else message.role
        )
        out: list[str | int] = []
        for j, part in enumerate(parts):
            param = f"messages.{i}.content" + (f".{j}" if isinstance(message.content, list) else "")
            if isinstance(part, TextPart):
                _check_text(part.text, param)
                if part.text:
                    out.append(part.text)
                continue
            if role != "user":
                raise ApiError(
                    400, f"{param}: images are only allowed in user messages", param, "invalid_value"
                )
            url_param = (
                f"{param}.image_url.url" if isinstance(part.image_url, ImageURL) else f"{param}.image_url"
            )
            raw = await _image_bytes(part.url, url_param, api, limits.max_image_bytes, fetch)
            plans.append(await asyncio.to_thread(_plan, raw, url_param, bounds, settings))  # off the loop
            out.append(len(images))
            images.append(raw)
        if role == "user":
            prompt = "".join(p for p in out if isinstance(p, str))
        turns.append(Turn(role, tuple(out), _tool_calls(message, i)))
    image_tokens = sum(p.tokens for p in plans)
    if image_tokens > limits.max_prompt_tokens:
        raise ApiError(
            413,
            f"messages: the images are {image_tokens} tokens, over the prompt limit of "
            f"{limits.max_prompt_tokens} tokens; send fewer or smaller images, or a lower max_pixels",
            "messages",
            "context_length_exceeded",
        )
    sampling = sampling_of(req, limits.max_completion_tokens)
    last = images[-1] if images else None
    query = Query(last, prompt, bounds, image_tokens, request_id, sampling)
    tools = tools_json(req.tools) if req.tools else None
    if tools is not None or not _is_infer_request(turns, prompt):
        query = Query(
            last, prompt, bounds, image_tokens, request_id, sampling, tuple(turns), tuple(images), tools
        )
    return Conversation(query, tuple(plans))


def _tool_calls(message: ChatMessage, i: int) -> tuple[tuple[str, str], ...]:
    """An assistant message's tool calls as (name, arguments) for the template."""
    if not message.tool_calls:
        return ()
    if message.role != "assistant":
        param = f"messages.{i}.tool_calls"
        raise ApiError(400, f"{param}: only assistant messages make tool calls", param, "invalid_value")
    for j, call in enumerate(message.tool_calls):
        _check_text(call.function.name, f"messages.{i}.tool_calls.{j}.function.name")
        _check_text(call.function.arguments, f"messages.{i}.tool_calls.{j}.function.arguments")
    return tuple((c.function.name, c.function.arguments) for c in message.tool_calls)


def _is_infer_request(turns: list[Turn], prompt: str) -> bool:
    """One user message: one image, then non-blank text (what /infer sends the engine)."""
    if len(turns) != 1 or turns[0].role != "user":
        return False
    parts = turns[0].parts
    return (
        bool(parts) and parts[0] == 0 and all(isinstance(p, str) for p in parts[1:]) and bool(prompt.strip())
    )


def _plan(raw: bytes, param: str, bounds: PixelBounds, settings: GatewaySettings) -> ImagePlan:
    """Verify the image and plan what the model sees of it (its size on the patch grid, its tokens)."""
    limits = settings.limits
    try:
        img = verify_image(
            raw,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            formats=limits.image_formats,
            field=param,
        )
    except BadInput as e:
        raise ApiError(
            e.status if e.status == 413 else 400,
            f"{param}: {e.message}",
            param,
            "too_large" if e.status == 413 else "invalid_image",
        ) from e
    try:
        return plan(img.width, img.height, bounds, settings.image_factor)
    except ValueError as e:  # qwen-vl-utils refuses aspect ratios over 200:1
        raise ApiError(400, f"{param}: image is {img.width}x{img.height}: {e}", param, "invalid_image") from e


# ----------------------------------------------------------------------------- responses
class MoeInfo(BaseModel):
    """The ``moe`` object: who answered and how; a plain OpenAI client ignores it."""

    request_id: str = Field(description="This request's id (also the X-Request-Id header).")
    adapter: str | None = Field(description="Adapter that answered; null for the bare base model.")
    mode: Mode = Field(description="Which deployment generated the answer.")
    routed_via: RoutedVia = Field(
        description="How the adapter was chosen: explicit (the model named it) or by the router."
    )
    confidence: float | None = Field(
        description="Routing confidence (null unless the routed model was asked)."
    )
    fallback: bool = Field(description="True when the merged deployment failed and dynamic answered.")
    merged_version: str | None = Field(description="Merged model version, when mode is merged.")
    images: list[ImageInfo] = Field(
        description="Each image as sent and as the model saw it: scale an action's coordinates by "
        "width / model_width and height / model_height."
    )


#: Why a choice ended, as OpenAI names it: tool_calls when the answer is one or more tool calls.
ChoiceFinish = Literal["stop", "length", "tool_calls"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Log probabilities of the answer's tokens, from the model's raw logits (before penalties,
    grammar masks and temperature)."""

    content: list[TokenLogprobOut]
    refusal: None = None


def choice_logprobs(logprobs: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[top(t, v) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: ChoiceFinish = Field(
        description="stop: end of text or a stop string; length: max_tokens; tool_calls: the answer is tool calls."
    )
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")
    image_tokens: int = Field(description="The images' share of prompt_tokens.")


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens as the model read them: template, text and images.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0, images: int = 0) -> CompletionUsage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached, image_tokens=images),
        )


class ChatCompletion(BaseModel):
    """OpenAI's ``chat.completion``, plus the ``moe`` object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The model as the request named it.")
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None
    moe: MoeInfo


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def chat_completion(
    model: str,
    text: str,
    finish_reason: FinishReason,
    usage: CompletionUsage,
    info: MoeInfo,
    *,
    calls: Sequence[ToolCall] = (),
    logprobs: Sequence[TokenLogprob] | None = None,
) -> ChatCompletion:
    """The answer as OpenAI's ``chat.completion``; with ``calls``, its tool calls (``text`` is what else
    the model wrote, None when nothing) and finish reason ``tool_calls``."""
    message = ChatMessageOut(
        content=(text or None) if calls else text,
        tool_calls=[
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls
        ]
        or None,
    )
    finish: ChoiceFinish = "tool_calls" if calls and finish_reason == "stop" else finish_reason
    return ChatCompletion(
        id=completion_id(info.request_id),
        created=int(time.time()),
        model=model,
        choices=[
            Choice(
                message=message,
                finish_reason=finish,
                logprobs=choice_logprobs(logprobs) if logprobs is not None else None,
            )
        ],
        usage=usage,
        moe=info,
    )


def moe_headers(info: MoeInfo) -> dict[str, str]:
    """The ``moe`` object's routing facts as response headers (known before a stream's first byte)."""
    headers = {
        "X-Moe-Mode": info.mode,
        "X-Moe-Routed-Via": info.routed_via,
        "X-Moe-Fallback": "true" if info.fallback else "false",
    }
    if info.adapter is not None:
        headers["X-Moe-Adapter"] = info.adapter
    if info.confidence is not None:
        headers["X-Moe-Confidence"] = f"{info.confidence:.4f}"
    if info.merged_version is not None:
        headers["X-Moe-Merged-Version"] = info.merged_version
    return headers


def sse(data: Mapping[str, Any]) -> str:
    """One Server-Sent Event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class ChunkWriter:
    """The ``chat.completion.chunk`` events of one stream: the role first (with ``moe``), then the text,
    then the finish reason, then (with ``include_usage``) a usage chunk whose choices are empty."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def _chunk(
        self,
        delta: dict[str, Any] | None,
        finish: ChoiceFinish | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        lp = choice_logprobs(logprobs).model_dump(mode="json") if logprobs else None
        choices = (
            [] if delta is None else [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]
        )
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def role(self, info: MoeInfo) -> str:
        return sse(self._chunk({"role": "assistant", "content": ""}) | {"moe": info.model_dump(mode="json")})

    def content(self, text: str, logprobs: Sequence[TokenLogprob] | None = None) -> str:
        return sse(self._chunk({"content": text}, logprobs=logprobs))

    def tool_call(self, index: int, call: ToolCall, logprobs: Sequence[TokenLogprob] | None = None) -> str:
        """A tool call as OpenAI streams one: its id, type and name first, then its arguments."""
        head = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        args = {"index": index, "function": {"arguments": call.arguments}}
        return sse(self._chunk({"tool_calls": [head]}, logprobs=logprobs)) + sse(
            self._chunk({"tool_calls": [args]})
        )

    def finish(self, reason: ChoiceFinish, logprobs: Sequence[TokenLogprob] | None = None) -> str:
        return sse(self._chunk({}, reason, logprobs))

    def usage(self, usage: CompletionUsage) -> str:
        return sse(self._chunk(None) | {"usage": usage.model_dump(mode="json")})

    @staticmethod
    def error(e: ApiError) -> str:
        return sse(e.body())


# ----------------------------------------------------------------------------- API keys
class ApiKeys:
    """The accepted API keys: ``api.key_env``'s value and ``api.key_file``'s lines (re-read when the file
    changes, so a rotated Kubernetes Secret applies without a restart). Compared in constant time."""

    def __init__(self, env: str | None, file: str | None) -> None:
        self.env, self.file = env, file
        self._stamp: tuple[int, int] | None = None
        self._file_keys: tuple[bytes, ...] = ()
        if not self.keys():
            raise ConfigError(
                f"api: no API key found (api.key_env {env!r}: "
                f"{'set' if env and os.environ.get(env) else 'unset or empty'}; api.key_file {file!r}: "
                f"{'no key in it' if file and Path(file).is_file() else 'missing'}); set one, or unset both "
                "to serve without keys"
            )

    @classmethod
    def of(cls, api: ApiConfig) -> ApiKeys | None:
        return cls(api.key_env, api.key_file) if api.keys_required else None

    def keys(self) -> tuple[bytes, ...]:
        env = os.environ.get(self.env, "").strip() if self.env else ""
        return ((env.encode(),) if env else ()) + self._read_file()

    def _read_file(self) -> tuple[bytes, ...]:
        if self.file is None:
            return ()
        try:
            st = os.stat(self.file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                lines = Path(self.file).read_text().splitlines()
                self._file_keys = tuple(
                    s.encode() for s in (x.strip() for x in lines) if s and not s.startswith("#")
                )
                self._stamp = stamp
        except OSError as e:  # a missing file holds no key: fail closed
            logger.warning("api: cannot read api.key_file %s: %s", self.file, e)
            self._stamp, self._file_keys = None, ()
        return self._file_keys

    def accepts(self, authorization: str | None) -> bool:
        """``Authorization: Bearer <key>`` with one of the keys."""
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        ok = False
        for key in self.keys():
            ok |= hmac.compare_digest(given, key)  # no early exit: every key is compared
        return ok


_KEYS: list[ApiKeys | None] = [None]


def set_api_keys(keys: ApiKeys | None) -> None:
    """The replica's keys, for :class:`ApiKeyMiddleware` (the gateway sets them when it starts)."""
    _KEYS[0] = keys


#: Called with (path, status) for each request the middleware refuses (the gateway's metrics).
Refused = Callable[[str, int], None]
_REFUSED: list[Refused] = []


class ApiKeyMiddleware:
    """ASGI middleware: with keys on, every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer``;
    a refusal is a 401 before the body is read (OpenAI's shape under /v1, ``/infer``'s elsewhere)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = _KEYS[0]
        if scope["type"] != "http" or keys is None:
            await self.app(scope, receive, send)
            return
        root, path = scope.get("root_path", ""), scope.get("path", "")
        path = path[len(root) :] if root and path.startswith(root) else path
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if keys.accepts(header):
            await self.app(scope, receive, send)
            return
        message = "missing or wrong API key: send Authorization: Bearer <key>"
        if path.startswith("/v1/"):
            response = ApiError(401, message, None, "invalid_api_key").response()
        else:
            response = JSONResponse(status_code=401, content=error_body("authorization", message))
        response.headers["WWW-Authenticate"] = "Bearer"
        for refused in _REFUSED:
            refused(path, 401)
        await response(scope, receive, send)


#: The largest request body the gateway reads (``limits.max_body_bytes``), set by the gateway at start.
_BODY_LIMIT: list[int | None] = [None]


def set_body_limit(max_bytes: int | None) -> None:
    _BODY_LIMIT[0] = max_bytes


class BodyLimitMiddleware:
    """ASGI middleware: a body over ``limits.max_body_bytes`` is refused with a 413 before it is read
    whole (by its Content-Length, or while it streams in when it has none), so no request can push the
    gateway out of memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = _BODY_LIMIT[0]
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(path, limit)(scope, receive, send)
            return
        seen, refused = 0, False

        async def counted() -> Message:
            """The body as it streams in; past the limit, the client gets the 413 and the app a disconnect."""
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    await _too_large(path, limit)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:  # the app's own answer to a body it never got whole is dropped
                await send(message)

        await self.app(scope, counted, guarded)


def _too_large(path: str, limit: int) -> JSONResponse:
    message = f"request body is over the limit of {limit} bytes (limits.max_body_bytes)"
    for refused in _REFUSED:
        refused(path, 413)
    if "/v1/" in path:
        return ApiError(413, message, None, "too_large").response()
    return JSONResponse(status_code=413, content=error_body("body", message))


def on_refused(callback: Refused) -> None:
    """Count the middleware's refusals (the gateway's metrics); the last callback set wins."""
    _REFUSED[:] = [callback]
