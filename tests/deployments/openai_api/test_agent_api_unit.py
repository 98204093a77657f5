"""The agent's API at the gateway, on fake deployments: structured outputs and tool choice become the
query's constraint, the model's <tool_call> blocks become OpenAI tool calls (streamed as tool-call
deltas that join to the unstreamed answer), logprobs and the sampling extras reach the engine, and
vLLM's /health and /version answer. The real model runs in test_serve_e2e.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.openai_api.tool_calls import ToolCall, ToolCallParser
from tests.deployments.openai_api.test_openai_unit import Service, _data_url, _user

COMPUTER = {
    "type": "function",
    "function": {
        "name": "computer",
        "description": "Click on the screen.",
        "parameters": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
        },
    },
}
WAIT = {"type": "function", "function": {"name": "wait", "parameters": {"type": "object"}}}
CALL = '<tool_call>\n{"name": "computer", "arguments": {"x": 3, "y": 1}}\n</tool_call>'


@pytest.fixture
def svc(monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """A gateway on fake deployments (test_openai_unit's), found by Serve's view through a fake replica context."""
    from ray import serve

    service = Service()
    monkeypatch.setattr(
        serve, "get_replica_context", lambda: SimpleNamespace(servable_object=service.gateway)
    )
    yield service


def _sampling(svc: Service) -> Any:
    query, _ = svc.merged.queries[-1]
    return query.sampling


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "json_schema", "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"type": "object"}},
                }
            },
            "json_schema",
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"regex": r"click\(\d, \d\)"}}, "regex", "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'start: "a"'}}, "grammar", "structured_outputs.grammar"),
        ({"guided_json": {"type": "object"}}, "json_schema", "guided_json"),
        ({"guided_regex": "a+"}, "regex", "guided_regex"),
        ({"guided_choice": ["a"]}, "choice", "guided_choice"),
        ({"tools": [COMPUTER, WAIT], "tool_choice": "required"}, "tool_calls", "tools"),
        (
            {"tools": [COMPUTER, WAIT], "tool_choice": {"type": "function", "function": {"name": "wait"}}},
            "tool_calls",
            "tools",
        ),
    ],
)
def test_each_way_of_asking_for_a_format_becomes_the_querys_constraint(
    svc: Service, body: dict[str, Any], kind: str, param: str
) -> None:
    assert svc.chat(**body).status_code == 200
    s = _sampling(svc)
    assert (s.constraint.kind, s.constraint.param) == (kind, param)
    assert s.expert_grammar is False  # the request's own format replaces the expert's


def test_a_named_tool_choice_constrains_to_that_tool_alone(svc: Service) -> None:
    choice = {"type": "function", "function": {"name": "wait"}}
    svc.chat(tools=[COMPUTER, WAIT], tool_choice=choice, parallel_tool_calls=True)
    tools, parallel = _sampling(svc).constraint.tools()
    assert [t.name for t in tools] == ["wait"] and parallel is False
    svc.chat(tools=[COMPUTER, WAIT], tool_choice="required", parallel_tool_calls=False)
    tools, parallel = _sampling(svc).constraint.tools()
    assert [t.name for t in tools] == ["computer", "wait"] and parallel is False


@pytest.mark.parametrize(
    ("body", "expert_grammar"),
    [({}, True), ({"tools": [COMPUTER]}, False), ({"tools": [COMPUTER], "tool_choice": "none"}, True)],
)
def test_the_experts_grammar_applies_unless_the_model_may_call_tools(
    svc: Service, body: dict[str, Any], expert_grammar: bool
) -> None:
    svc.chat(**body)
    s = _sampling(svc)
    assert s.constraint is None and s.expert_grammar is expert_grammar


def test_the_sampling_extras_reach_the_engine_never_ignored(svc: Service) -> None:
    """GuideLLM's ignore_eos (and min_tokens, top_k, the penalties) used to be dropped silently."""
    svc.chat(
        ignore_eos=True,
        min_tokens=3,
        max_tokens=8,
        top_k=5,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logprobs=True,
        top_logprobs=2,
    )
    s = _sampling(svc)
    assert (s.ignore_eos, s.min_tokens, s.max_tokens, s.top_k) == (True, 3, 8, 5)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.logprobs) == (1.2, 0.5, 0.25, 2)
    svc.chat(top_k=-1)
    assert _sampling(svc).top_k == 0  # vLLM's "off"


def test_tool_calls_come_back_as_openai_tool_calls_and_malformed_ones_as_content(svc: Service) -> None:
    out = svc.sdk.chat.completions.create(model="calendar", messages=[_user(CALL)], tools=[COMPUTER])  # type: ignore[list-item]
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("computer", {"x": 3, "y": 1})
    assert choice.message.content == "calendar says "  # the fake model's words before the call
    broken = CALL.replace('"y": 1}}', '"y": 1')
    out = svc.sdk.chat.completions.create(model="calendar", messages=[_user(broken)], tools=[COMPUTER])  # type: ignore[list-item]
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls
    assert out.choices[0].message.content == "calendar says " + broken
    out = svc.sdk.chat.completions.create(model="calendar", messages=[_user(CALL)], tools=[WAIT])  # type: ignore[list-item]
    assert not out.choices[0].message.tool_calls  # a function that was not offered: text
    out = svc.sdk.chat.completions.create(model="calendar", messages=[_user(CALL)])  # type: ignore[list-item]
    assert out.choices[0].message.content == "calendar says " + CALL  # no tools: never parsed


def test_a_streamed_tool_call_joins_to_the_unstreamed_one(svc: Service) -> None:
    two = CALL + "\n" + CALL.replace('"x": 3', '"x": 0')
    whole = svc.sdk.chat.completions.create(model="calendar", messages=[_user(two)], tools=[COMPUTER])  # type: ignore[list-item]
    chunks = list(
        svc.sdk.chat.completions.create(
            model="calendar", messages=[_user(two)], tools=[COMPUTER], stream=True
        )  # type: ignore[list-item]
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            got = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            got["id"] += d.id or ""
            got["name"] += (d.function.name or "") if d.function else ""
            got["arguments"] += (d.function.arguments or "") if d.function else ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert content == whole.choices[0].message.content
    streamed = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    assert streamed == [
        (t.function.name, t.function.arguments) for t in whole.choices[0].message.tool_calls or []
    ]
    assert all(c["id"].startswith("call_") for c in calls.values()) and len(streamed) == 2


def test_tool_results_and_assistant_calls_in_the_history_reach_the_template(svc: Service) -> None:
    messages = [
        _user("Click Save"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "computer", "arguments": '{"x": 1, "y": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "clicked"},
        {"role": "user", "content": "and now?"},
    ]
    r = svc.chat(messages=messages, tools=[COMPUTER])
    assert r.status_code == 200, r.text
    query, _ = svc.merged.queries[-1]
    assert [t.role for t in query.turns] == ["user", "assistant", "tool", "user"]
    assert query.turns[1].tool_calls == (("computer", '{"x": 1, "y": 2}'),)
    assert query.turns[2].parts == ("clicked",)
    assert json.loads(query.tools or "[]")[0]["function"]["name"] == "computer"
    bad = svc.chat(
        messages=[_user(), {"role": "user", "content": "x", "tool_calls": messages[1]["tool_calls"]}]
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages.1.tool_calls"


def test_logprobs_in_the_answer_and_on_the_stream(svc: Service) -> None:
    out = svc.sdk.chat.completions.create(
        model="calendar",
        messages=[_user()],
        logprobs=True,
        top_logprobs=2,  # type: ignore[list-item]
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert "".join(t.token for t in lp.content) == out.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in lp.content)
    chunks = list(
        svc.sdk.chat.completions.create(
            model="calendar",
            messages=[_user()],
            logprobs=True,
            top_logprobs=2,
            stream=True,  # type: ignore[list-item]
        )
    )
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in lp.content]
    plain = svc.sdk.chat.completions.create(model="calendar", messages=[_user()])  # type: ignore[list-item]
    assert plain.choices[0].logprobs is None


def test_usage_names_cached_and_image_tokens(svc: Service) -> None:
    out = svc.sdk.chat.completions.create(model="calendar", messages=[_user()])  # type: ignore[list-item]
    details = out.usage.prompt_tokens_details if out.usage else None
    assert details is not None and details.cached_tokens == 4
    assert details.model_dump()["image_tokens"] == 70


def test_health_and_version_as_vllm_has_them(svc: Service) -> None:
    r = svc.http.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert svc.http.get("/version").json() == {"version": "0.1.0"}


def test_infer_takes_structured_outputs_and_reports_logprobs(svc: Service) -> None:
    import base64

    image = base64.b64encode(base64.b64decode(_data_url().split(",", 1)[1])).decode()
    body = {"image_b64": image, "prompt": "Click", "expert": "calendar"}
    r = svc.http.post("/infer", json=body | {"structured_outputs": {"regex": "a+"}, "logprobs": True})
    assert r.status_code == 200, r.text
    s = _sampling(svc)
    assert s.constraint.param == "structured_outputs.regex" and s.logprobs == 0
    out = r.json()
    assert [t["token"] for t in out["logprobs"]] == ["calendar", " says", " Click"]
    assert out["answer_logprob"] == pytest.approx(-1.5)
    r = svc.http.post("/infer", json=body | {"guided_regex": "a", "guided_choice": ["b"]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "guided_choice"
    plain = svc.http.post("/infer", json=body).json()
    assert plain["logprobs"] is None and _sampling(svc).expert_grammar is True


@pytest.mark.parametrize(
    ("pieces", "content", "calls"),
    [
        (["hi <tool", "_call>\n", '{"name": "f", "arguments": {}}', "\n</tool_call>"], ["hi "], ["f"]),
        (["<tool_call>{bad}</tool_call>"], ["<tool_call>{bad}</tool_call>"], []),
        (
            ['<tool_call>\n{"name": "f"', ', "arguments": {}}'],
            ['<tool_call>\n{"name": "f", "arguments": {}}'],
            [],
        ),
        ([CALL.replace("computer", "f"), "\n\n", CALL.replace("computer", "f")], [], ["f", "f"]),
        ([CALL.replace("computer", "f"), " then text"], [" then text"], ["f"]),
        (["a < b and <tool_c"], ["a < b and <tool_c"], []),
    ],
)
def test_the_tool_call_parser_over_pieces(pieces: list[str], content: list[str], calls: list[str]) -> None:
    parser = ToolCallParser(["f"])
    out = [x for p in pieces for x in parser.feed(p)] + parser.end()
    assert "".join(x for x in out if isinstance(x, str)) == "".join(content)
    assert [x.name for x in out if isinstance(x, ToolCall)] == calls
