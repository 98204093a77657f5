"""What a constrained answer must look like: a :class:`Constraint`, plain data (no torch), and the
llguidance grammar it stands for (:func:`grammar_text`, which imports llguidance when first called).

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
from typing import Any, Literal, cast

__all__ = [
    "JSON_LAYOUT",
    "MAX_GRAMMAR_CHARS",
    "Constraint",
    "ConstraintKind",
    "GrammarError",
    "ToolSpec",
    "grammar_text",
    "tool_call_lark",
]

ConstraintKind = Literal["json_schema", "regex", "choice", "grammar", "tool_calls"]
#: The longest grammar text (schema, regex, grammar) a request may bring.
MAX_GRAMMAR_CHARS = 64 * 1024
#: How JSON is laid out: json.dumps' separators, no free whitespace (a sampling model cannot wander off
#: into endless whitespace, and tool-call arguments read as Qwen's template writes them).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A constraint that cannot be turned into a grammar (not JSON, an empty choice)."""


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

    def grammar_text(self) -> str:
        """This constraint as an llguidance grammar (:func:`grammar_text`)."""
        return grammar_text(self)

    def tools(self) -> tuple[list[ToolSpec], bool]:
        """A ``tool_calls`` constraint's functions and whether several calls may follow each other."""
        body = json.loads(self.value)
        return [ToolSpec(t["name"], t["parameters"]) for t in body["tools"]], bool(body["parallel"])


def tool_call_lark(constraint: Constraint) -> str:
    """A ``tool_calls`` constraint as Lark: ``<tool_call>\\n{json}\\n</tool_call>`` blocks, the JSON being
    ``{"name": <one of the tools>, "arguments": <that tool's parameters schema>}``."""
    tools, parallel = constraint.tools()
    bodies = []
    for k, tool in enumerate(tools):
        schema = {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": JSON_LAYOUT,
        }
        bodies.append(f"tool{k}: %json {json.dumps(schema, ensure_ascii=False)}")
    choice = " | ".join(f"tool{k}" for k in range(len(tools)))
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, f'call: "<tool_call>\\n" ({choice}) "\\n</tool_call>"', *bodies])


def grammar_text(c: Constraint) -> str:
    """The llguidance grammar of ``c`` (not yet checked: a matcher built from it, or
    ``LLMatcher.validate_grammar``, reports its errors). Imports llguidance (a small Rust wheel) on first use."""
    import llguidance

    if c.kind == "json_schema":
        try:
            schema = json.loads(c.value)
        except ValueError as e:
            raise GrammarError(f"not valid JSON: {e}") from e
        if schema is True:
            schema = {}  # anything
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema is an object, got {json.dumps(schema)[:40]}")
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=cast(Any, JSON_LAYOUT)))
    if c.kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(c.value))
    if c.kind == "choice":
        options = json.loads(c.value)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("expected a non-empty list of non-empty strings")
        return str(llguidance.grammar_from("choice", c.value))
    if c.kind == "tool_calls":
        return str(llguidance.LLMatcher.grammar_from_lark(tool_call_lark(c)))
    if c.kind == "grammar":
        try:
            return str(llguidance.grammar_from("grammar", c.value))  # Lark, or GBNF/EBNF converted to Lark
        except ValueError as e:
            raise GrammarError(str(e)) from e
    raise GrammarError(f"unknown constraint kind {c.kind!r}")
