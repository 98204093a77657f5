"""`python -m benchmarks --gpu --dry-run`: the GPU benchmark's code on the tiny shapes on the CPU writes every
figure the GPU run reports, without matplotlib and without Ray (the GPU machine has neither)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_env import check_transformers, hbm_tb_s

ROOT = Path(__file__).resolve().parents[2]
MODES = ("eager", "cuda_graphs")
VARIANTS = ("base", "merged", "dynamic_1", "dynamic_8")
BATCHES = ("1", "8", "32")

# matplotlib missing (as on the GPU machine); afterwards, nothing of Ray or the merge jobs was imported
RUN = """
import sys
sys.modules["matplotlib"] = None
from benchmarks.__main__ import main
rc = main(sys.argv[1:])
absent = ("ray", "merge_jobs", "benchmarks.core", "moe_demo")
imported = sorted(m for m in sys.modules if any(m == a or m.startswith(a + ".") for a in absent))
assert not imported, imported
sys.exit(rc)
"""


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("gpu-dry-run")
    r = subprocess.run(
        [sys.executable, "-c", RUN, "--gpu", "--dry-run", "--out-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "gpu-dry-run.json").read_text())


def test_every_decode_figure_is_there_and_positive(dry_run: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    _, result = dry_run
    assert result["dry_run"] is True and result["skipped"] == []
    for mode in MODES:
        for variant in VARIANTS:
            for batch in BATCHES:
                f = result["decode"][mode][variant][batch]
                for key in ("ms_per_token", "x_floor", "floor_ms", "tokens_per_s", "floor_with_kv_ms"):
                    assert _positive(f[key]), (mode, variant, batch, key, f[key])
                assert f["steps"] >= 1
                if batch != "1":  # requests joined running rows and left at different times
                    assert f["join_steps"] >= int(batch) - 1 and f["leave_steps"] >= 1, f
        assert result["decode"][mode]["dynamic_8"]["8"]["adapters_in_batch"] == 8
        assert result["decode"][mode]["dynamic_1"]["32"]["adapters_in_batch"] == 1
        assert result["decode"][mode]["base"]["32"]["adapters_in_batch"] == 0


def test_ttft_and_the_bandwidth_floor(dry_run: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    _, result = dry_run
    for mode in MODES:
        for variant in ("merged", "dynamic_1"):
            t = result["ttft"][mode][variant]
            assert _positive(t["ms"]) and _positive(t["engine_ms"]) and t["samples"] >= 1
    floor = result["floor"]
    assert _positive(floor["floor_ms"]) and floor["hbm_tb_s"] == 3.35
    # Qwen3-VL-8B: ~15.1 GB of weights read per decode step, 4.5 ms at an H100's 3.35 TB/s
    assert 15.0 < floor["qwen3_vl_8b_weights_read_per_step_gb"] < 15.3
    assert 4.45 < floor["qwen3_vl_8b_floor_ms"] < 4.6
    assert result["screenshot"]["image_tokens"] > 0


def test_result_files_without_matplotlib(dry_run: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    out, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu-dry-run.json", "gpu-dry-run.md"]
    md = (out / "gpu-dry-run.md").read_text()
    assert "| dynamic, 8 mixed adapters |" in md and "Time to first token" in md


def test_old_transformers_is_refused_naming_the_fix() -> None:
    with pytest.raises(ImportError, match=r"transformers >= 5\.24.*got 5\.17\.0.*prepare-wheels\.sh"):
        check_transformers("5.17.0")
    check_transformers("5.24.0")
    check_transformers("5.30.1")


@pytest.mark.parametrize(
    ("device", "tb_s"),
    [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H200", 4.8), ("cpu", 3.35)],
)
def test_bandwidth_by_device_name(device: str, tb_s: float) -> None:
    assert hbm_tb_s(device) == tb_s


def test_dry_run_needs_gpu() -> None:
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["--dry-run"])
