"""OpenAI's chat completion request, what its schema cannot say, and the sampling it asks for."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.messages import SamplingParams
from deployments.openai_api.errors import ApiError
from deployments.openai_api.outputs import StructuredFields, constraint_of
from deployments.openai_api.tool_calls import NamedToolChoice, Tool, ToolCallIn, tool_constraint
from deployments.schemas import BadInput

__all__ = [
    "UNSUPPORTED",
    "ChatCompletionRequest",
    "ChatMessage",
    "ImagePart",
    "ImageURL",
    "TextPart",
    "calls_tools",
    "check_request",
    "sampling_of",
]

#: The ``seed`` range OpenAI documents (a signed 64-bit integer).
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_STOP = 16


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


def sampling_of(req: ChatCompletionRequest, max_completion_tokens: int) -> SamplingParams:
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
    try:
        return SamplingParams(
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
    except ValueError as e:  # a value the request model lets through but generation refuses: the field first
        raise ApiError.of(BadInput(str(e).split(" ", 1)[0], str(e), 400)) from e


def calls_tools(req: ChatCompletionRequest) -> bool:
    """The model may answer with tool calls (tools given, tool_choice not none): they are parsed back."""
    return bool(req.tools) and req.tool_choice != "none"
