"""`python -m benchmarks --quick` runs end to end and writes result files of the documented shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out-dir", str(tmp_path), "--name", "smoke"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert {"name", "command", "machine", "summary", "samples_s"} <= set(result)
    s = result["summary"]
    for key in (
        "latency_base",
        "latency_merged",
        "latency_dynamic",
        "decode_per_token_dynamic",
        "batch_mixed",
        "batch_single",
        "serial_switching",
        "classify",
        "expert_request",
        "cold_request",
        "warm_request",
    ):
        assert s["p50_ms"][key] > 0, key
    for ratio in (
        "merged/base latency",
        "dynamic/merged latency",
        "mixed/single batch throughput",
        "mixed batch/serial throughput",
        "routing/expert request",
        "cold/warm request",
    ):
        assert s["ratios"][ratio] > 0, ratio
    assert s["figures"]["rss_mb_1_adapters"] > 0 and s["figures"]["merge_s"] > 0
    f = s["figures"]  # benchmarks/step_bench.py, on the padded step uncompiled (static) in the smoke run
    for key in ("ops_step_base_eager", "ops_step_mixed8_static", "ops_lora_per_slotted_linear_eager"):
        assert f[key] > 0, key
    assert f["ops_layer_mixed8_eager"] > f["ops_layer_base_eager"]  # the LoRA slots' operations counted
    assert s["p50_ms"]["step_mixed8_b16_static"] > 0 and f["dynamic/merged decode step b1 static"] > 0
    assert "| ratio | measured | target | met |" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
