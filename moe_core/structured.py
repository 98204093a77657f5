"""What a constrained answer must look like: a :class:`Constraint`, pure data (no torch, no grammar library).

A constraint is built where a request is read (the gateway, or an expert's declared grammar in the
config) and compiled where the model is (:mod:`moe_core.engine.constraints`, which caches the compiled
grammar by the constraint's content). It names the request field it came from (``param``), so a schema
that does not compile is a 400 naming that field.

Kinds, as vLLM's ``structured_outputs`` has them: ``json_schema`` (a JSON schema, or ``{"type":
"object"}`` for OpenAI's ``json_object``), ``regex``, ``choice`` (one of a list of strings), ``grammar``
(a Lark grammar, or GBNF/EBNF as llama.cpp and xgrammar write it), and ``tool_calls``: one or more
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks, the format Qwen's chat template
teaches, whose arguments follow each function's JSON schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MAX_GRAMMAR_CHARS", "Constraint", "ConstraintKind", "ToolSpec"]

ConstraintKind = Literal["json_schema", "regex", "choice", "grammar", "tool_calls"]
#: The longest grammar text (schema, regex, grammar) a request may bring.
MAX_GRAMMAR_CHARS = 64 * 1024


@dataclass(frozen=True)
class ToolSpec:
    """One function a tool call may name, with the JSON schema of its arguments."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class Constraint:
    """An answer's grammar: ``kind`` and its text (``value``), and the request field it came from."""

    kind: ConstraintKind
    value: str  # JSON text for json_schema, choice and tool_calls; the pattern or grammar otherwise
    param: str = ""  # the request field it came from, e.g. response_format.json_schema.schema

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar depends on (its cache key): not the field it came from."""
        return (self.kind, self.value)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool, param: str) -> Constraint:
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), param)

    @classmethod
    def json_object(cls, param: str) -> Constraint:
        """Any JSON object (OpenAI's ``response_format: {type: json_object}``)."""
        return cls.json_schema({"type": "object"}, param)

    @classmethod
    def regex(cls, pattern: str, param: str) -> Constraint:
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options: Sequence[str], param: str) -> Constraint:
        return cls("choice", json.dumps(list(options), ensure_ascii=False), param)

    @classmethod
    def grammar(cls, text: str, param: str) -> Constraint:
        return cls("grammar", text, param)

    @classmethod
    def tool_calls(cls, tools: Sequence[ToolSpec], *, parallel: bool, param: str) -> Constraint:
        """One tool call of any of ``tools`` (more than one, each on its own line, when ``parallel``)."""
        body = {
            "tools": [{"name": t.name, "parameters": dict(t.parameters)} for t in tools],
            "parallel": parallel,
        }
        return cls("tool_calls", json.dumps(body, ensure_ascii=False), param)

    def tools(self) -> tuple[list[ToolSpec], bool]:
        """A ``tool_calls`` constraint's functions and whether several calls may follow each other."""
        body = json.loads(self.value)
        return [ToolSpec(t["name"], t["parameters"]) for t in body["tools"]], bool(body["parallel"])
