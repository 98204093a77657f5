from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, EngineError, GenerationRequest
from tests.helpers import screenshot


@pytest.fixture(scope="module")
def engine(loras: dict[str, Path]) -> Engine:
    e = Engine.load(DeploymentConfig().engine, name="test")
    for name, path in loras.items():
        e.load_adapter(name, path)
    return e


def test_mixed_adapter_batch_equals_solo_rows(engine: Engine) -> None:
    """One generate call mixing 3 adapters and the bare base gives each row's solo output, token for token."""
    assert engine.model.dtype == torch.float32
    adapters = ["alpha", "beta", None, "gamma", "alpha", None]
    reqs = [
        GenerationRequest(screenshot(i, (200 + 20 * i, 160)), f"Click the button {i}", a, max_new_tokens=12)
        for i, a in enumerate(adapters)
    ]
    before = engine.forwards
    mixed = engine.generate(reqs)
    assert engine.forwards == before + 1
    assert {r.batch_size for r in mixed} == {6} and mixed[0].adapters_in_batch == 4
    solo = [engine.generate([r])[0] for r in reqs]
    assert [m.text for m in mixed] == [s.text for s in solo]
    # the adapters really change the output (otherwise the equality above proves little)
    texts = {
        a: engine.generate([GenerationRequest(reqs[0].image, reqs[0].prompt, a)])[0].text for a in adapters
    }
    assert len(set(texts.values())) == 4


def test_unknown_adapter_is_an_error(engine: Engine) -> None:
    with pytest.raises(EngineError, match="not loaded"):
        engine.generate([GenerationRequest(screenshot(0), "x", "nope")])


def test_classify_single_forward_and_sequence_paths(engine: Engine) -> None:
    img = screenshot(3)
    res = engine.classify(img, "Which screen is this?", ["calendar", "desktop", "appointment"], "gamma")
    assert res.label in res.scores and abs(sum(res.scores.values()) - 1) < 1e-5
    assert res.confidence == max(res.scores.values())
    # labels sharing a first token take the batched full-sequence path
    tok = engine.processor.tokenizer
    labels = ["calendar x", "calendar y"]
    assert tok.encode(labels[0])[0] == tok.encode(labels[1])[0]
    res2 = engine.classify(img, "Which screen is this?", labels, "gamma")
    assert set(res2.scores) == set(labels) and 0.0 < res2.confidence <= 1.0


def test_load_unload_is_idempotent(loras: dict[str, Path]) -> None:
    e = Engine.load(DeploymentConfig().engine, name="t2")
    base = e.generate([GenerationRequest(screenshot(1), "hi")])[0].text
    e.load_adapter("alpha", loras["alpha"])
    e.load_adapter("alpha", loras["alpha"])  # replacing is fine
    e.unload_adapter("alpha")
    e.unload_adapter("alpha")
    assert e.adapters == []
    assert e.generate([GenerationRequest(screenshot(1), "hi")])[0].text == base
