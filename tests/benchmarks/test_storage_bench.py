"""`python -m benchmarks --only storage` at a smoke size: the fetch-throughput figures are all there, and
the parallel way really reads in parallel (1 MiB parts: each 5 MB shard is 5 ranged reads). The 1 GB run
is `python -m benchmarks --only storage`, kept out of `make test`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_storage_benchmark_reports_s3_and_local_single_and_parallel(tmp_path: Path) -> None:
    args = [
        "--only",
        "storage",
        "--storage-gb",
        "0.02",
        "--storage-part-mb",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "storage-smoke",
    ]
    subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    figures = json.loads((tmp_path / "storage-smoke.json").read_text())["summary"]["figures"]
    for way in ("s3_single", "s3_parallel", "local_single", "local_parallel", "local_in_place"):
        assert figures[f"{way}_MB_per_s"] > 0, way
    assert figures["storage_version_bytes"] == 20_000_000
    assert figures["storage_s3_parallel_vs_single_speedup"] > 0
    for where in ("s3", "local"):  # four shards of 5 parts each, and the config file
        assert (
            figures[f"storage_{where}_single_ranged_reads"]
            == figures[f"storage_{where}_parallel_ranged_reads"]
            == 21
        )
        assert figures[f"storage_{where}_single_parallel_files"] == 0
        assert figures[f"storage_{where}_parallel_parallel_files"] == 4, "the parallel path was not taken"
    assert "| s3_parallel_MB_per_s |" in (tmp_path / "storage-smoke.md").read_text()
