"""Structured outputs as clients ask for them: OpenAI's ``response_format`` and vLLM's
``structured_outputs`` (and its older ``guided_*`` fields), read into one
:class:`~moe_core.structured.Constraint` that names the field it came from.

Shared by ``/v1/chat/completions`` and ``/infer`` (:class:`StructuredFields`). No model here: the
constraint is compiled where the model is, and a schema that does not compile comes back as a 400
naming its field; what can be told from the request alone (two sources at once, a schema that is no
object, an empty choice) is refused here, before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import BadInput
from moe_core.structured import MAX_GRAMMAR_CHARS, Constraint

__all__ = [
    "JsonSchemaFormat",
    "ResponseFormat",
    "StructuredFields",
    "StructuredOutputs",
    "constraint_of",
]


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class JsonSchemaSpec(_Part):
    name: str = Field(default="response", pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The schema's name.")
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON schema the answer must validate against."
    )
    description: str | None = Field(default=None, description="Accepted and ignored.")
    strict: bool | None = Field(default=None, description="Always enforced (the answer is decoded under it).")


class TextFormat(_Part):
    type: Literal["text"]


class JsonObjectFormat(_Part):
    type: Literal["json_object"]


class JsonSchemaFormat(_Part):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec = Field(description="{name, schema, strict}, as OpenAI defines it.")


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(_Part):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json", description="A JSON schema.")
    regex: str | None = Field(default=None, description="A regular expression (Rust regex syntax).")
    choice: list[str] | None = Field(default=None, description="The answer is one of these strings.")
    grammar: str | None = Field(
        default=None, description="A Lark grammar, or GBNF/EBNF as llama.cpp writes it."
    )
    json_object: bool | None = Field(default=None, description="Any JSON object.")


class StructuredFields(BaseModel):
    """The request fields that constrain an answer (at most one of them may be given)."""

    response_format: ResponseFormat | None = Field(
        default=None, description="{type: text | json_object | json_schema}, as OpenAI has it."
    )
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM's: {json | regex | choice | grammar | json_object}."
    )
    guided_json: dict[str, Any] | str | None = Field(
        default=None, description="vLLM's older name: a JSON schema."
    )
    guided_regex: str | None = Field(default=None, description="vLLM's older name: a regular expression.")
    guided_choice: list[str] | None = Field(
        default=None, description="vLLM's older name: one of these strings."
    )
    guided_grammar: str | None = Field(default=None, description="vLLM's older name: a grammar.")


def _schema(value: dict[str, Any] | str, param: str) -> Constraint:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError as e:
            raise BadInput(param, f"not valid JSON: {e}", 400) from e
        if not isinstance(value, dict):
            raise BadInput(param, "a JSON schema must be an object", 400)
    return Constraint.json_schema(value, param)


def _text(value: str, param: str, kind: Literal["regex", "grammar"]) -> Constraint:
    if not value.strip():
        raise BadInput(param, f"an empty {kind}", 400)
    if len(value) > MAX_GRAMMAR_CHARS:
        raise BadInput(param, f"{len(value)} characters, over the limit of {MAX_GRAMMAR_CHARS}", 400)
    return Constraint.regex(value, param) if kind == "regex" else Constraint.grammar(value, param)


def _choice(options: list[str], param: str) -> Constraint:
    if not options or not all(options):
        raise BadInput(param, "expected a non-empty list of non-empty strings", 400)
    return Constraint.choice(options, param)


def _read(
    json_: dict[str, Any] | str | None,
    regex: str | None,
    choice: list[str] | None,
    grammar: str | None,
    name: Callable[[str], str],
) -> list[Constraint]:
    """The constraints of vLLM's four kinds, as ``structured_outputs`` and the older ``guided_*`` fields
    both carry them; ``name`` gives each kind's field name (for the error naming it)."""
    found = []
    if json_ is not None:
        found.append(_schema(json_, name("json")))
    if regex is not None:
        found.append(_text(regex, name("regex"), "regex"))
    if choice is not None:
        found.append(_choice(choice, name("choice")))
    if grammar is not None:
        found.append(_text(grammar, name("grammar"), "grammar"))
    return found


def _from_structured(so: StructuredOutputs) -> list[Constraint]:
    found = _read(so.json_, so.regex, so.choice, so.grammar, lambda kind: f"structured_outputs.{kind}")
    if so.json_object:
        found.append(Constraint.json_object("structured_outputs.json_object"))
    if len(found) != 1:
        raise BadInput(
            "structured_outputs",
            f"give exactly one of json, regex, choice, grammar, json_object (got {len(found)})",
            400,
        )
    return found


def constraint_of(req: StructuredFields) -> Constraint | None:
    """The answer's constraint from whichever field asks for one; two fields at once are a 400."""
    found: list[Constraint] = []
    fmt = req.response_format
    if isinstance(fmt, JsonObjectFormat):
        found.append(Constraint.json_object("response_format"))
    elif isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.schema_
        if schema is None:
            raise BadInput(
                "response_format.json_schema.schema", "a json_schema response format needs a schema", 400
            )
        found.append(Constraint.json_schema(schema, "response_format.json_schema.schema"))
    if req.structured_outputs is not None:
        found += _from_structured(req.structured_outputs)
    found += _read(
        req.guided_json,
        req.guided_regex,
        req.guided_choice,
        req.guided_grammar,
        lambda kind: f"guided_{kind}",
    )
    if len(found) > 1:
        fields = [c.param.split(".")[0] for c in found]
        raise BadInput(fields[1], f"only one of {fields} may constrain the answer", 400)
    return found[0] if found else None
