"""The embedded demo: deterministic builds, no-op rebuilds, configured types only, accuracy floors."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_core.config import DeploymentConfig
from moe_core.demo.build import build_demo, evaluate_demo, plan
from moe_core.demo.screens import GRID, SCREEN_TYPES, make_screen, split
from moe_core.storage import Storage


def _small_cfg(root: Path) -> DeploymentConfig:
    return DeploymentConfig.from_dict(
        {
            "storage": {"url": str(root / "storage")},
            "router": {"adapter": "router", "labels": {0: "calendar", 1: "login-window"}},
            "merged": {"adapters": [{"name": "calendar"}]},
            "dynamic": {"adapters": ["login-window"]},
            "limits": {"image_size": 128},
        }
    )


def test_screens_are_deterministic_and_split() -> None:
    a, b = make_screen("calendar", 3), make_screen("calendar", 3)
    assert a.image.tobytes() == b.image.tobytes() and a.cell == b.cell
    assert a.answer == f"click({a.cell[0]}, {a.cell[1]})" and 0 <= max(a.cell) < GRID
    train = {(s.kind, s.seed) for s in split("train", 20)}
    held = {(s.kind, s.seed) for s in split("heldout", 20)}
    assert not train & held and {k for k, _ in train} == set(SCREEN_TYPES)
    with pytest.raises(ValueError, match="unknown screen type"):
        make_screen("spreadsheet", 0)


def test_build_is_bit_for_bit_deterministic_and_rebuild_is_a_noop(tmp_path: Path) -> None:
    shas = []
    for run in ("one", "two"):
        cfg = _small_cfg(tmp_path / run)
        report = build_demo(
            cfg, tmp_path / run / "work", steps_scale=0.02, heldout_per_kind=2, say=lambda s: None
        )
        assert {r["status"] for r in report.rows} == {"built"}
        st = Storage(cfg.storage.url)
        shas.append(
            {
                n: st.read_json(k, n, "deploy_metadata.json")["adapter_sha256"]  # type: ignore[arg-type]
                for k, n in (("routing", "router"), ("lora", "calendar"), ("lora", "login-window"))
            }
        )
    assert shas[0] == shas[1]
    again = build_demo(_small_cfg(tmp_path / "one"), tmp_path / "one" / "work", steps_scale=0.02,
                       heldout_per_kind=2, say=lambda s: None)  # fmt: skip
    assert {r["status"] for r in again.rows} == {"unchanged"}
    assert again.seconds < 10


def test_screen_types_missing_from_config_are_not_trained(tmp_path: Path) -> None:
    cfg = _small_cfg(tmp_path)
    assert plan(cfg).kinds == ("calendar", "login-window")
    build_demo(cfg, tmp_path / "work", steps_scale=0.01, heldout_per_kind=1, say=lambda s: None)
    st = Storage(cfg.storage.url)
    assert st.names("lora") == ["calendar", "login-window"]
    assert st.names("routing") == ["router"]
    assert not list((tmp_path / "work").glob("desktop*"))


ROUTER_FLOOR = 0.9
EXPERT_FLOOR = 0.4  # held-out exact match on a 4x4 grid; chance is 1/16


@pytest.mark.slow
def test_trained_adapters_meet_accuracy_floors(demo_cfg: DeploymentConfig) -> None:
    st = Storage(demo_cfg.storage.url)
    meta = st.read_json("routing", "router", "deploy_metadata.json")
    assert meta["eval_accuracy"] >= ROUTER_FLOOR and meta["dataset_name"] == "synthetic-screens-v1"
    rows = {r["name"]: r for r in evaluate_demo(demo_cfg, heldout_per_kind=8, offset=900)}
    assert rows["router"]["accuracy"] >= ROUTER_FLOOR
    for kind in SCREEN_TYPES:
        stored = st.read_json("lora", kind, "deploy_metadata.json")["eval_accuracy"]
        assert stored >= EXPERT_FLOOR, (kind, stored)
        assert rows[kind]["accuracy"] > rows[kind]["base_accuracy"], kind  # the expert, not the base, knows
