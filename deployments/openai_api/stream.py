"""A streamed answer: OpenAI's ``chat.completion.chunk`` events as Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.messages import TokenLogprob
from deployments.openai_api.errors import ApiError
from deployments.openai_api.responses import ChoiceFinish, CompletionUsage, MoeInfo, choice_logprobs
from deployments.openai_api.tool_calls import ToolCall

__all__ = ["DONE", "ChunkWriter", "sse"]

#: The end of every stream, after the last chunk (or after an error object).
DONE = "data: [DONE]\n\n"


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
