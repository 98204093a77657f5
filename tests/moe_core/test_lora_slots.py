"""LoRA slots: a mixed batch in one pass, equal to PEFT's per-row outputs (fp32, greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge_jobs.merge import merge_loaded
from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, EngineError, GenerationRequest
from tests.helpers import make_lora, screenshot

ADAPTERS = ["alpha", None, "beta", "gamma", "alpha", None, "gamma", "beta"]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three adapters of different ranks (2, 4, 8); gamma also adapts the LM head."""
    root = tmp_path_factory.mktemp("ranked")
    return {
        "alpha": make_lora(root / "alpha", seed=11, rank=4),
        "beta": make_lora(root / "beta", seed=12, rank=8),
        "gamma": make_lora(root / "gamma", seed=13, rank=2, lm_head=True),
    }


@pytest.fixture(scope="module")
def engines(ranked: dict[str, Path]) -> tuple[Engine, Engine]:
    settings = DeploymentConfig().engine_settings
    peft, slots = Engine.load(settings, name="peft"), Engine.load(settings, name="slots")
    slots.set_lora_slots(4, 8)
    for name, path in ranked.items():
        peft.load_adapter(name, path)
        slots.load_adapter(name, path)
    return peft, slots


def _requests() -> list[GenerationRequest]:
    return [
        GenerationRequest(screenshot(i, (192 + 16 * i, 160)), f"Click button {i}", a, max_new_tokens=12)
        for i, a in enumerate(ADAPTERS)
    ]


def test_mixed_batch_equals_peft_per_row(engines: tuple[Engine, Engine]) -> None:
    peft, slots = engines
    reqs = _requests()
    mixed = slots.generate(reqs)
    assert [r.text for r in mixed] == [r.text for r in peft.generate(reqs)]
    assert [r.text for r in mixed] == [slots.generate([r])[0].text for r in reqs]  # each row as alone
    assert len({r.text for r in mixed[:4]}) == 4  # base and the three adapters really differ
    diff = (slots.logits(reqs) - peft.logits(reqs)).abs().max()
    assert float(diff) < 1e-4


def test_base_rows_are_the_bare_model_exactly(engines: tuple[Engine, Engine]) -> None:
    _, slots = engines
    reqs = _requests()
    plain = Engine.load(DeploymentConfig().engine_settings, name="plain")
    base_rows = [i for i, a in enumerate(ADAPTERS) if a is None]
    mixed = slots.logits(reqs)
    alone = plain.logits([reqs[i] for i in base_rows])
    for j, i in enumerate(base_rows):
        n = int(alone.shape[1])
        assert torch.equal(mixed[i, -n:], alone[j])  # left padding: compare the unpadded tail


def test_slot_limits_and_lifecycle(ranked: dict[str, Path], tmp_path: Path) -> None:
    e = Engine.load(DeploymentConfig().engine_settings, name="life")
    e.set_lora_slots(2, 4)
    big = make_lora(tmp_path / "big", seed=5, rank=8)
    with pytest.raises(EngineError, match="rank 8 is over the slots' maximum rank 4"):
        e.load_adapter("big", big)
    e.load_adapter("alpha", ranked["alpha"])
    e.load_adapter("gamma", ranked["gamma"])
    with pytest.raises(EngineError, match="all 2 slots are taken"):
        e.load_adapter("delta", ranked["alpha"])
    req = [GenerationRequest(screenshot(1), "Click", "gamma", max_new_tokens=8)]
    before = e.generate(req)[0].text
    e.unload_adapter("alpha")
    e.unload_adapter("alpha")  # idempotent
    e.set_lora_slots(1, 4)  # gamma moves to slot 0, keeping its weights
    assert e.adapters == ["gamma"] and e.generate(req)[0].text == before
    with pytest.raises(EngineError, match="not loaded"):
        e.generate([GenerationRequest(screenshot(1), "Click", "alpha")])
    with pytest.raises(EngineError, match="merging needs PEFT"):
        merge_loaded(e, "gamma")


def test_reloading_adapters_keeps_no_memory(engines: tuple[Engine, Engine], ranked: dict[str, Path]) -> None:
    """A dynamic replica loads adapters all day (LRU churn): a load must leave nothing behind.
    safetensors' ``load_file`` kept ~2 KB of Python objects per call (found by the soak)."""
    import gc
    import tracemalloc

    slots = engines[1]
    assert slots.slots is not None

    def churn(n: int) -> None:
        for _ in range(n):
            slots.slots.load("alpha", ranked["alpha"])  # type: ignore[union-attr]

    churn(20)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn(300)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"300 adapter loads kept {grown} bytes"
