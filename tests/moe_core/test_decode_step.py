"""The static decode step (engine.step static / compile) and LoRA slots read in place.

Every step's logits of the padded static step, eager or compiled with inductor, equal the
variable-shape eager path per row (fp32, greedy) for mixed batches with base rows; padding rows never
reach the null page, a real row's pages or a real row's result; the slots equal PEFT per row at ranks
2, 4 and 8 while rows join and leave; and what the slots keep per batch composition is index metadata,
never gathered weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_core.config import DeploymentConfig, EngineSettings
from moe_core.engine import Engine, GenerationRequest
from moe_core.engine.graphs import BUCKETS, bucket
from moe_core.engine.scheduler import Scheduler
from moe_core.generation import SamplingParams
from tests.helpers import make_lora, screenshot

SETTINGS: EngineSettings = DeploymentConfig(limits={"min_pixels": 16384, "max_pixels": 65536}).engine_settings
ADAPTERS = ["alpha", None, "beta", "gamma", "alpha", None]  # 6 rows: a bucket of 8, two padding rows


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("step")
    return {
        "alpha": make_lora(root / "alpha", seed=21, rank=2),
        "beta": make_lora(root / "beta", seed=22, rank=4, lm_head=True),
        "gamma": make_lora(root / "gamma", seed=23, rank=8),
    }


def _engine(ranked: dict[str, Path], step: str, slots: bool = True) -> Engine:
    kv = SETTINGS.kv.model_copy(update={"step": step})
    e = Engine.load(SETTINGS.model_copy(update={"kv": kv}), name=step)
    if slots:
        e.set_lora_slots(4, 8)
    for name, path in ranked.items():
        e.load_adapter(name, path)
    return e


@pytest.fixture(scope="module")
def engines(ranked: dict[str, Path]) -> dict[str, Engine]:
    return {mode: _engine(ranked, mode) for mode in ("eager", "static", "compile")}


def _requests(adapters: Sequence[str | None] = ADAPTERS, tokens: int = 10) -> list[GenerationRequest]:
    return [
        GenerationRequest(screenshot(i, (200, 160)), f"Click button {i}", a, max_new_tokens=tokens)
        for i, a in enumerate(adapters)
    ]


def _recorded(engine: Engine, requests: list[GenerationRequest]) -> tuple[list[str], list[torch.Tensor]]:
    """The answers, and the logits of every step of the runner, in order."""
    runner = engine.runner
    steps: list[torch.Tensor] = []
    forward = runner.forward

    def record(rows: Any) -> torch.Tensor:
        out = forward(rows)
        steps.append(out.clone())
        return out

    runner.forward = record  # type: ignore[method-assign]
    try:
        return [r.text for r in engine.generate(requests)], steps
    finally:
        del runner.forward


def test_buckets() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    assert bucket(33) is None and BUCKETS == (1, 2, 4, 8, 16, 32)


@pytest.mark.parametrize("mode", ["static", "compile"])
def test_the_static_step_equals_the_eager_path_per_row(engines: dict[str, Engine], mode: str) -> None:
    eager, other = engines["eager"], engines[mode]
    reqs = _requests()
    texts, steps = _recorded(eager, reqs)
    graphs = other.runner.graphs
    assert graphs is not None and eager.runner.graphs is None
    before = graphs.steps
    other_texts, other_steps = _recorded(other, reqs)
    assert other_texts == texts
    as_base = eager.generate(_requests([None] * len(ADAPTERS)))
    assert all(b.text != t for b, t, a in zip(as_base, texts, ADAPTERS, strict=True) if a)  # adapters matter
    assert graphs.steps - before >= 8  # the decode steps took the static path
    assert len(other_steps) == len(steps)
    for ours, theirs in zip(other_steps, steps, strict=True):
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) < 1e-4


def test_padding_rows_never_leak(engines: dict[str, Engine]) -> None:
    engine = engines["static"]
    graphs = engine.runner.graphs
    assert graphs is not None
    solo = [engine.generate([r])[0].text for r in _requests(ADAPTERS[:3])]
    engine.pages.clear_cache()
    scratch = engine.kv.scratch
    for layer in range(engine.kv.layout.layers):
        engine.kv.page(layer, scratch)[0].zero_()
    padded = graphs.padded_rows
    three = [r.text for r in engine.generate(_requests(ADAPTERS[:3]))]  # a bucket of 4: one padding row
    assert graphs.padded_rows > padded
    assert three == solo
    for layer in range(engine.kv.layout.layers):
        k, v = engine.kv.page(layer, 0)
        assert k.eq(0).all() and v.eq(0).all()  # the null page, which masked reads see, stays zero
    assert engine.kv.page(0, scratch)[0].abs().sum() > 0  # the padding wrote where nobody reads


def _run_staggered(
    engine: Engine, reqs: list[GenerationRequest], tokens: list[int], joins: list[int]
) -> list[str]:
    """Row ``i`` joins at step ``joins[i]`` and leaves after ``tokens[i]`` tokens."""
    sched = Scheduler(engine, name="staggered", max_running=8)
    texts = [""] * len(reqs)
    done = [False] * len(reqs)

    def sink(i: int) -> Any:
        def put(item: Any) -> None:
            assert not isinstance(item, BaseException), item
            texts[i] += item.text
            done[i] = done[i] or item.finish_reason is not None

        return put

    step = 0
    while not all(done):
        for i, at in enumerate(joins):
            if at == step:
                params = SamplingParams(max_tokens=tokens[i], min_tokens=tokens[i])
                sched.enqueue(reqs[i], params, sink(i), request_id=f"r{i}")
        sched.iterate()
        step += 1
        assert step < 500
    return texts


def test_slots_equal_peft_per_row_at_ranks_2_4_8_while_rows_join_and_leave(
    engines: dict[str, Engine], ranked: dict[str, Path]
) -> None:
    engine = engines["static"]
    slots = engine.slots
    assert slots is not None
    peft = _engine(ranked, "eager", slots=False)
    adapters = ["alpha", "beta", None, "gamma", "beta", "alpha", None, "gamma"]
    reqs = _requests(adapters)
    tokens = [12, 4, 9, 6, 12, 3, 8, 10]
    joins = [0, 0, 2, 3, 3, 6, 7, 9]
    weights = {n: (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) for n, layer in slots.layers.items()}
    compositions = slots.compositions
    texts = _run_staggered(engine, reqs, tokens, joins)
    alone = [
        peft.generate([r], sampling=[SamplingParams(max_tokens=n, min_tokens=n)])[0].text
        for r, n in zip(reqs, tokens, strict=True)
    ]
    assert texts == alone
    assert slots.compositions > compositions  # the batch changed composition many times...
    # ...and each composition kept a few integers, never the slots' weights gathered for it
    assert slots.metadata_bytes <= 8 * 64 * len(slots._cached)
    assert weights == {
        n: (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) for n, layer in slots.layers.items()
    }


def test_a_failed_cuda_graph_capture_runs_the_step_eagerly(engines: dict[str, Engine]) -> None:
    engine, eager = engines["static"], engines["eager"]
    graphs = engine.runner.graphs
    assert graphs is not None and not torch.cuda.is_available()
    reqs = _requests(ADAPTERS[:3])
    graphs.mode = "cuda_graphs"  # here the capture fails at its first step (no CUDA device)
    try:
        texts = [r.text for r in engine.generate(reqs)]
        assert graphs.mode == "static" and graphs.captures == 0  # fell back, and stays so
    finally:
        graphs.mode = "static"
    assert texts == [r.text for r in eager.generate(reqs)]
