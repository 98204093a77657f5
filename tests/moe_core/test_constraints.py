"""Constrained decoding, logprobs and the sampling extras on the real tiny model, through the scheduler:
answers follow their grammar at temperature 1 (and only because of it), constrained and free rows share
a batch and each answers as alone, a preempted row resumes its grammar, bad grammars name their field."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jsonschema
import pytest

from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest
from moe_core.engine.constraints import ConstraintError, Grammars
from moe_core.engine.scheduler import Scheduler, run_batch
from moe_core.generation import SamplingParams
from moe_core.structured import Constraint, ToolSpec
from tests.helpers import screenshot

SETTINGS = DeploymentConfig(limits={"min_pixels": 16384, "max_pixels": 16384}).engine_settings
#: A computer-use action: bounded, so a random model under the grammar always completes it.
ACTION = {
    "type": "object",
    "properties": {
        "action": {"enum": ["click", "double_click", "type", "scroll"]},
        "x": {"type": "integer", "minimum": 0, "maximum": 9},
        "y": {"type": "integer", "minimum": 0, "maximum": 9},
        "text": {"type": "string", "maxLength": 8},
    },
    "required": ["action", "x", "y"],
    "additionalProperties": False,
}
CLICK = r"click\([0-3], [0-3]\)"
FLAG = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(SETTINGS, name="constrained")


def _req(i: int, prompt: str = "Click the Save button") -> GenerationRequest:
    return GenerationRequest(screenshot(i, (128, 128)), prompt)


def _sampled(engine: Engine, constraint: Constraint | None, n: int = 50, max_tokens: int = 128) -> list[str]:
    """``n`` answers at temperature 1, each with its own seed, all in one batch."""
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, constraint=constraint)
        for s in range(n)
    ]
    return [c.text for c in run_batch(engine, [_req(s) for s in range(n)], params)]


def _valid_json(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_a_json_schema_answer_validates_in_50_of_50_samples_and_only_because_of_the_grammar(
    engine: Engine,
) -> None:
    constrained = _sampled(engine, Constraint.json_schema(ACTION, "response_format"))
    free = _sampled(engine, None, n=20, max_tokens=64)
    bad = [t for t in constrained if not _valid_json(t, ACTION)]
    assert not bad, bad
    assert sum(_valid_json(t, ACTION) for t in free) == 0, free  # the tiny model alone never writes one
    assert len(set(constrained)) > 10  # sampled, not one answer forced 50 times
    print(f"50 sampled under the schema, e.g. {constrained[:3]}; unconstrained, e.g. {free[:2]}")


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (Constraint.regex(CLICK, "structured_outputs.regex"), lambda t: re.fullmatch(CLICK, t) is not None),
        (
            Constraint.choice(["yes", "no", "click(3, 1)"], "structured_outputs.choice"),
            lambda t: t in {"yes", "no", "click(3, 1)"},
        ),
    ],
)
def test_regex_and_choice_hold_in_50_of_50_samples(
    engine: Engine, constraint: Constraint, check: Any
) -> None:
    constrained = _sampled(engine, constraint)
    assert all(check(t) for t in constrained), [t for t in constrained if not check(t)]
    assert not any(check(t) for t in _sampled(engine, None, n=20, max_tokens=64))
    assert len(set(constrained)) > 1


def test_constrained_and_free_rows_in_one_batch_answer_as_alone(engine: Engine) -> None:
    """Greedy: a batch mixing schema, regex, choice and free rows gives each row its solo answer; the
    free rows are untouched by the others' masks."""
    kinds = [
        Constraint.json_schema(ACTION, "a"),
        None,
        Constraint.regex(CLICK, "b"),
        None,
        Constraint.choice(["Save", "Cancel"], "c"),
        None,
        Constraint.json_schema(FLAG, "d"),
        None,
    ]
    reqs = [_req(i, f"Click button {i}") for i in range(len(kinds))]
    params = [SamplingParams(max_tokens=128 if c else 48, constraint=c) for c in kinds]  # free rows: shorter
    batch = run_batch(engine, reqs, params)
    alone = [run_batch(engine, [r], [p])[0] for r, p in zip(reqs, params, strict=True)]
    assert [c.text for c in batch] == [c.text for c in alone]
    assert _valid_json(batch[0].text, ACTION) and re.fullmatch(CLICK, batch[2].text)
    assert batch[4].text in {"Save", "Cancel"} and _valid_json(batch[6].text, FLAG)


def test_logprobs_are_finite_nonpositive_and_top1_is_the_greedy_token(engine: Engine) -> None:
    params = SamplingParams(max_tokens=12, min_tokens=12, logprobs=5)
    (done,) = run_batch(engine, [_req(3)], [params])
    assert len(done.logprobs) == 12
    for lp in done.logprobs:
        assert math.isfinite(lp.logprob) and lp.logprob <= 0
        assert len(lp.top) == 5 and all(v <= 0 for _, v in lp.top)
        assert lp.top[0] == (lp.token, lp.logprob)  # greedy: the chosen token is the most likely
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert "".join(lp.token for lp in done.logprobs).strip() == done.text
    (plain,) = run_batch(engine, [_req(3)], [SamplingParams(max_tokens=12, min_tokens=12)])
    assert plain.logprobs == () and plain.text == done.text


def test_a_constrained_row_preempted_mid_answer_resumes_its_grammar(engine: Engine) -> None:
    """A KV cache too small for four long constrained answers at once: rows are preempted, their
    matchers rebuilt from their tokens when they come back, and every answer is its solo one."""
    pattern = r"(click\([0-3], [0-3]\) ){5}"
    reqs = [_req(30 + i) for i in range(4)]
    params = SamplingParams(max_tokens=64, constraint=Constraint.regex(pattern, "r"))
    solo = [run_batch(engine, [r], [params])[0].text for r in reqs]
    p = engine.kv.layout.page_tokens
    prompt_pages = max(-(-len(engine.prompts.build(r)) // p) for r in reqs)
    kv = SETTINGS.kv.model_copy(update={"prefix_caching": False})
    small = Engine(
        engine.model,
        engine.processor,
        SETTINGS.model_copy(update={"kv": kv}),
        name="tight",
        kv_cache_bytes=(4 * prompt_pages + 2) * engine.kv.layout.bytes_per_page,
    )
    sched = Scheduler(small, max_running=4, name="tight")
    out: list[list[Any]] = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        sched.enqueue(r, params, out[i].append, request_id=f"r{i}")
    while sched.iterate():
        pass
    texts = ["".join(d.text for d in o) for o in out]
    assert sched.preemptions > 0 and texts == solo
    assert all(re.fullmatch(pattern, t + " ") for t in texts), texts  # the answer is stripped


def test_a_named_tool_call_grammar_gives_arguments_that_validate(engine: Engine) -> None:
    params_schema = {
        "type": "object",
        "properties": {
            "x": {"type": "integer", "minimum": 0, "maximum": 99},
            "button": {"enum": ["left", "right"]},
        },
        "required": ["x", "button"],
        "additionalProperties": False,
    }
    tool = Constraint.tool_calls([ToolSpec("computer", params_schema)], parallel=False, param="tool_choice")
    for text in _sampled(engine, tool, n=10, max_tokens=160):
        m = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", text, re.S)
        assert m, text
        call = json.loads(m.group(1))
        assert call["name"] == "computer"
        jsonschema.validate(call["arguments"], params_schema)


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (Constraint.json_schema({"type": "objectx"}, "response_format.json_schema.schema"), "objectx"),
        (Constraint.json_schema({"type": "array", "uniqueItems": True}, "guided_json"), "uniqueItems"),
        (Constraint.regex("click((", "structured_outputs.regex"), "unclosed"),
        (Constraint.grammar("start: ((", "structured_outputs.grammar"), "Expected"),
        (Constraint.choice([], "guided_choice"), "non-empty"),
        (Constraint.json_schema({"$ref": "#/nope"}, "response_format.json_schema.schema"), "nope"),
    ],
)
def test_a_grammar_that_does_not_compile_names_its_field(
    engine: Engine, constraint: Constraint, words: str
) -> None:
    with pytest.raises(ConstraintError, match=words) as e:
        engine.grammars.compile(constraint)
    assert e.value.param == constraint.param
    sched = Scheduler(engine, name="refuse")
    with pytest.raises(ConstraintError):  # refused at submit: it never joins a batch
        sched.enqueue(_req(1), SamplingParams(constraint=constraint), lambda _: None)


def test_grammars_are_compiled_once_per_content_in_a_bounded_cache(engine: Engine) -> None:
    g = Grammars(engine.processor.tokenizer, engine.grammars.vocab, engine.eos_token_ids, capacity=2)
    a, b, c = (Constraint.regex(p, "x") for p in ("a+", "b+", "c+"))
    first = g.compile(a)
    assert g.compile(Constraint.regex("a+", "another field")) is first  # same content, same grammar
    g.compile(b), g.compile(c)  # a is the least recently used: dropped
    assert g.compile(a) is not first
    assert g.stats["grammar_compiles"] == 4 and g.stats["grammar_cache_hits"] == 1
    assert engine.grammars.capacity == engine.settings.kv.grammar_cache_size == 128  # the engine's: config


def test_sampling_extras_change_what_they_should(engine: Engine) -> None:
    """ignore_eos runs to max_tokens; top_k 1 is greedy; a strong repetition penalty changes a greedy
    answer that repeats itself; presence and frequency penalties apply to the answer's tokens."""
    req = _req(5)
    (greedy,) = run_batch(engine, [req], [SamplingParams(max_tokens=40)])
    (long,) = run_batch(engine, [req], [SamplingParams(max_tokens=40, ignore_eos=True)])
    assert long.completion_tokens == 40
    (k1,) = run_batch(engine, [req], [SamplingParams(max_tokens=40, temperature=1.0, top_k=1, seed=3)])
    assert k1.text == greedy.text
    (rep,) = run_batch(
        engine, [req], [SamplingParams(max_tokens=40, ignore_eos=True, repetition_penalty=2.0)]
    )
    (pres,) = run_batch(engine, [req], [SamplingParams(max_tokens=40, ignore_eos=True, presence_penalty=2.0)])
    assert rep.text != long.text and pres.text != long.text
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
