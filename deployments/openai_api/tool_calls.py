"""Tool calling the way Qwen3-VL was trained: tools rendered by its chat template, its
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks read back as OpenAI ``tool_calls``.

- :func:`tool_constraint`: ``tool_choice`` ``required`` or a named function, as a grammar (the call's
  arguments follow the function's JSON schema); ``auto`` and ``none`` leave the answer free.
- :class:`ToolCallParser`: the model's text, fed as it streams (or whole), into content and tool calls,
  as vLLM's ``hermes`` parser reads Qwen's format. A block that is not valid JSON, or names no given
  function, is content: a malformed call in ``auto`` mode is the model's text, never a 5xx. Whitespace
  between calls is dropped, so the deltas of a stream join to the answer of the same request unstreamed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import BadInput
from moe_core.structured import Constraint, ToolSpec

__all__ = [
    "FunctionDef",
    "NamedToolChoice",
    "Tool",
    "ToolCall",
    "ToolCallIn",
    "ToolCallParser",
    "tool_constraint",
    "tools_json",
]

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionDef(_Part):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$", description="The function's name.")
    description: str | None = Field(default=None, description="What it does (shown to the model).")
    parameters: dict[str, Any] | None = Field(default=None, description="The JSON schema of its arguments.")
    strict: bool | None = Field(
        default=None, description="Accepted: required and named calls are always strict."
    )


class Tool(_Part):
    type: Literal["function"] = Field(description="Only functions.")
    function: FunctionDef


class FunctionName(_Part):
    name: str = Field(description="The function to call.")


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: FunctionName


class FunctionCallIn(_Part):
    name: str = Field(description="The function called.")
    arguments: str = Field(description="Its arguments, as JSON text.")


class ToolCallIn(_Part):
    """An assistant's tool call sent back in the history."""

    id: str | None = Field(default=None, description="The call's id (tool messages name it).")
    type: Literal["function"] = "function"
    function: FunctionCallIn


@dataclass(frozen=True)
class ToolCall:
    """One call the model made."""

    id: str
    name: str
    arguments: str  # JSON text


def tools_json(tools: Sequence[Tool]) -> str:
    """The tools as the chat template gets them (OpenAI's shape, as JSON text)."""
    return json.dumps([t.model_dump(exclude_none=True) for t in tools], ensure_ascii=False)


def tool_constraint(
    tools: Sequence[Tool] | None,
    choice: Literal["none", "auto", "required"] | NamedToolChoice | None,
    parallel: bool | None,
) -> Constraint | None:
    """The grammar ``tool_choice`` asks for: ``required`` (a call of any tool) and a named function (a
    call of that one) are enforced; ``none`` and ``auto`` are not. Unknown names are a 400."""
    if choice is None or choice in ("none", "auto"):
        return None
    if not tools:
        raise BadInput("tool_choice", f"tool_choice {_name(choice)!r} needs tools", 400)
    specs = [ToolSpec(t.function.name, t.function.parameters or {"type": "object"}) for t in tools]
    if isinstance(choice, NamedToolChoice):
        named = [s for s in specs if s.name == choice.function.name]
        if not named:
            raise BadInput(
                "tool_choice",
                f"function {choice.function.name!r} is not among the tools {[s.name for s in specs]}",
                400,
            )
        return Constraint.tool_calls(named[:1], parallel=False, param="tools")
    return Constraint.tool_calls(specs, parallel=parallel is not False, param="tools")


def _name(choice: Any) -> str:
    return choice.function.name if isinstance(choice, NamedToolChoice) else str(choice)


class ToolCallParser:
    """The answer's text as content and tool calls, fed piece by piece; :meth:`feed` and :meth:`end`
    return what became final: text (content) and :class:`ToolCall` values, in order."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.calls = 0  # calls found
        self.calls_sent = 0  # calls a stream has sent (their index in OpenAI's deltas)
        self._buf = ""
        self._inside = False
        self._space = ""  # whitespace after a call, held until more content comes (dropped at the end)

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buf += text
        out: list[str | ToolCall] = []
        while True:
            if not self._inside:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _partial(self._buf, OPEN)
                    self._content(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                self._content(self._buf[:at], out)
                self._buf, self._inside = self._buf[at + len(OPEN) :], True
            at = self._buf.find(CLOSE)
            if at < 0:
                return out
            body, self._buf, self._inside = self._buf[:at], self._buf[at + len(CLOSE) :], False
            call = self._call(body)
            if call is None:
                self._content(OPEN + body + CLOSE, out)
            else:
                self._space = ""
                self.calls += 1
                out.append(call)

    def end(self) -> list[str | ToolCall]:
        """The rest: an unfinished block is content."""
        out: list[str | ToolCall] = []
        self._content((OPEN if self._inside else "") + self._buf, out)
        self._buf, self._inside = "", False
        return out

    def _content(self, text: str, out: list[str | ToolCall]) -> None:
        if not text:
            return
        if self.calls and not (self._space + text).strip():
            self._space += text  # whitespace between calls: not content (unless content follows)
            return
        out.append(self._space + text)
        self._space = ""

    def _call(self, body: str) -> ToolCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("name") not in self.names:
            return None
        args = data.get("arguments", data.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", data["name"], json.dumps(args, ensure_ascii=False))


def _partial(text: str, token: str) -> int:
    """Characters at the end of ``text`` that may begin ``token``."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0
