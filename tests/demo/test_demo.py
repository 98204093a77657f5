"""The embedded demo: deterministic builds, no-op rebuilds, configured types only, accuracy floors."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_core.config import DeploymentConfig
from moe_core.probes import read_probe_folder
from moe_core.storage import Storage
from moe_demo.build import ACCEPT, SEED_STRIDE, build_demo, evaluate_demo, plan
from moe_demo.screens import GRID, SCREEN_TYPES, make_screen, split
from moe_demo.train import END, FeatureBank


def _small_cfg(root: Path) -> DeploymentConfig:
    return DeploymentConfig.from_dict(
        {
            "storage": {"url": str(root / "storage")},
            "router": {"adapter": "router", "labels": {0: "calendar", 1: "login-window"}},
            "merged": {"adapters": [{"name": "calendar"}]},
            "dynamic": {"adapters": ["login-window"]},
            "limits": {"min_pixels": 128 * 128, "max_pixels": 128 * 128},
        }
    )


def test_screens_are_deterministic_and_split() -> None:
    a, b = make_screen("calendar", 3), make_screen("calendar", 3)
    assert a.image.tobytes() == b.image.tobytes() and a.cell == b.cell
    assert a.answer == f"click({a.cell[0]}, {a.cell[1]})" and 0 <= max(a.cell) < GRID
    train, val, held = ({(s.kind, s.seed) for s in split(n, 20)} for n in ("train", "validation", "heldout"))
    assert (
        not train & held and not train & val and not val & held and {k for k, _ in train} == set(SCREEN_TYPES)
    )
    with pytest.raises(ValueError, match="unknown screen type"):
        make_screen("spreadsheet", 0)
    with pytest.raises(ValueError, match="unknown split"):
        split("test", 1)


def test_feature_bank_gives_the_pixel_path_loss(tmp_path: Path) -> None:
    """Training on cached token ids and vision features is the same computation as on pixels."""
    import torch

    from moe_core.engine import Engine
    from moe_core.modeling import load_model, load_processor

    cfg = _small_cfg(tmp_path)
    examples = [(s, s.prompt, s.answer) for s in split("train", 2, ("calendar", "desktop"))]
    examples.append((examples[0][0], "A longer prompt, so the rows need padding", "click(0, 0)"))
    bank = FeatureBank(cfg, examples, system_prompt=cfg.system_prompt, clean=True)
    assert len(bank) == len(bank.clean_rows) == len(examples)
    cached = bank.batch(bank.rows)
    engine = Engine(load_model(cfg.base_model), load_processor(cfg.base_model), cfg.engine)
    pixels = engine.encode(
        [s.image for s, _, _ in examples],
        [p for _, p, _ in examples],
        answers=[a + END for _, _, a in examples],
        padding_side="right",
    )
    assert torch.equal(cached["input_ids"], pixels["input_ids"])
    assert torch.equal(cached["attention_mask"], pixels["attention_mask"])
    answer = cached["labels"] != -100
    assert answer.sum(-1).tolist() == [
        len(engine.processor.tokenizer.encode(a + END)) for _, _, a in examples
    ]
    with torch.no_grad():
        a = engine.model(**cached)
        b = engine.model(**pixels, labels=cached["labels"])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    clean = bank.batch(bank.clean_rows)  # the uncluttered twins: same tokens, other pixels
    assert torch.equal(clean["input_ids"], cached["input_ids"])
    assert not torch.equal(clean["mm_encoder_outputs"]["image"].pooler_output[0], bank.rows[0].image)


def test_build_is_bit_for_bit_deterministic_and_rebuild_is_a_noop(tmp_path: Path) -> None:
    shas = []
    for run in ("one", "two"):
        cfg = _small_cfg(tmp_path / run)
        report = build_demo(
            cfg, tmp_path / run / "work", steps_scale=0.02, heldout_per_kind=2, attempts=2, say=lambda s: None
        )
        assert {r["status"] for r in report.rows} == {"built"}
        st = Storage(cfg.storage.url)
        shas.append(
            {
                n: st.read_json(k, n, "deploy_metadata.json")["adapter_sha256"]  # type: ignore[arg-type]
                for k, n in (("router", "router"), ("expert", "calendar"), ("expert", "login-window"))
            }
        )
    assert shas[0] == shas[1]
    meta = Storage(_small_cfg(tmp_path / "one").storage.url).read_json(
        "expert", "calendar", "deploy_metadata.json"
    )
    # 9 steps cannot reach the 90% validation target, so both seeds were tried and the better one kept
    assert meta["attempts"] == 2 and meta["train_seed"] in (7, 7 + SEED_STRIDE)
    assert 0.0 <= meta["validation_accuracy"] < ACCEPT["expert"]
    assert not list((tmp_path / "one" / "work").glob("*.attempt*"))  # losing attempts are cleaned up
    st = Storage(_small_cfg(tmp_path / "one").storage.url)
    probes = {n: st.current_version("probes", n) for n in st.names("probes")}
    again = build_demo(
        _small_cfg(tmp_path / "one"),
        tmp_path / "one" / "work",
        steps_scale=0.02,
        heldout_per_kind=2,
        attempts=2,
        say=lambda s: None,
    )
    assert {r["status"] for r in again.rows} == {"unchanged"}
    assert {n: st.current_version("probes", n) for n in st.names("probes")} == probes  # not republished
    assert again.seconds < 10


def test_screen_types_missing_from_config_are_not_trained(tmp_path: Path) -> None:
    cfg = _small_cfg(tmp_path)
    assert plan(cfg).kinds == ("calendar", "login-window")
    build_demo(cfg, tmp_path / "work", steps_scale=0.01, heldout_per_kind=1, attempts=1, say=lambda s: None)
    st = Storage(cfg.storage.url)
    assert st.names("expert") == ["calendar", "login-window"]
    assert st.names("router") == ["router"]
    assert st.names("probes") == ["calendar", "default", "login-window"]  # the merge probe sets
    probes = read_probe_folder(st.fetch("probes", "calendar")[0])
    assert len(probes) == cfg.merge.num_probes and {p for _, p in probes} == {"Click the highlighted day"}
    assert not list((tmp_path / "work").glob("desktop*"))


ROUTER_FLOOR = 0.9
EXPERT_FLOOR = 0.8  # held-out exact match on a 4x4 grid; chance is 1/16 (the build's target is 0.9)


@pytest.mark.slow
def test_trained_adapters_meet_accuracy_floors(demo_cfg: DeploymentConfig) -> None:
    st = Storage(demo_cfg.storage.url)
    meta = st.read_json("router", "router", "deploy_metadata.json")
    assert meta["eval_accuracy"] >= ROUTER_FLOOR and meta["dataset_name"] == "synthetic-screens-v1"
    rows = {r["name"]: r for r in evaluate_demo(demo_cfg, heldout_per_kind=8, offset=900)}
    assert rows["router"]["accuracy"] >= ROUTER_FLOOR
    for kind in SCREEN_TYPES:
        meta = st.read_json("expert", kind, "deploy_metadata.json")
        assert meta["eval_accuracy"] >= EXPERT_FLOOR, (kind, meta["eval_accuracy"])
        assert meta["validation_accuracy"] >= ACCEPT["expert"], (kind, meta["validation_accuracy"])
        assert rows[kind]["accuracy"] >= 0.75, (kind, rows[kind])  # 8 more held-out screens, re-measured
        assert rows[kind]["accuracy"] > rows[kind]["base_accuracy"], kind  # the expert, not the base, knows
