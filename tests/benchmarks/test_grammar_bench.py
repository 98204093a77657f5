"""`python -m benchmarks --only grammar --quick`: the constrained-decoding figures are all there (the
full run is `python -m benchmarks --only grammar`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_grammar_benchmark_reports_cost_per_token_and_compile_time(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks", "--only", "grammar", "--quick", "--out-dir", str(tmp_path)]
    subprocess.run([*cmd, "--name", "g"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "g.json").read_text())
    figures = result["summary"]["figures"]
    for key in (
        "grammar_step_free_ms",
        "grammar_step_all_ms",
        "grammar_mask_apply_per_token_us",
        "grammar_compile_action_schema_ms",
        "grammar_compile_tool_call_ms",
        "grammar_cache_hit_ms",
    ):
        assert figures[key] > 0, key
    assert figures["grammar_cache_hit_ms"] < figures["grammar_compile_action_schema_ms"]
    assert figures["grammar_mask_fill_per_token_us"] == 0  # on the CPU the masks are made in the step
    assert "constrained/free row per token, batch 8" in result["summary"]["ratios"]
    assert (tmp_path / "g.md").read_text().count("grammar_") > 5
