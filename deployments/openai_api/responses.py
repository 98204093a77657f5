"""OpenAI's ``chat.completion``, with the ``moe`` object, and its routing facts as response headers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from deployments.messages import FinishReason, TokenLogprob
from deployments.openai_api.tool_calls import ToolCall
from deployments.routing import Mode, RoutedVia
from deployments.schemas import ImageInfo

__all__ = [
    "ChatCompletion",
    "ChoiceFinish",
    "CompletionUsage",
    "MoeInfo",
    "chat_completion",
    "choice_logprobs",
    "completion_id",
    "moe_headers",
]


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
    """OpenAI's usage object: the same counts as ``/infer``'s flat :class:`~deployments.schemas.Usage`,
    in OpenAI's wire shape (cached and image tokens under ``prompt_tokens_details``)."""

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
