"""A merge submitted as a real Ray job against a real local cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from merge_jobs.merge import merge_adapter
from merge_jobs.submit import submit_merge
from moe_core.storage.store import Storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_merge_as_ray_job_publishes(merge_cfg, ray_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg, path = merge_cfg
    t0 = time.perf_counter()
    out = submit_merge(
        ray_cluster["dashboard"],
        ["--config", str(path), "--adapter-name", "alpha"],
        working_dir=str(ROOT),
        follow=False,
        timeout_s=300,
    )
    job_s = time.perf_counter() - t0
    assert out.status == "SUCCEEDED", out.logs[-3000:]
    st = Storage(cfg.storage.url)
    version = st.current_version("merged", "alpha")
    assert version is not None and version in out.logs
    meta = st.read_json("merged", "alpha", "merge_metadata.json")
    assert meta["greedy_agreement"] == 1.0
    # the same merge in-process is a no-op now; time a fresh in-process merge for the job overhead
    assert not merge_adapter(cfg, "alpha").changed
    print(f"ray job merge: {job_s:.1f}s end to end; merge stages {meta['timings_s']}")


@pytest.mark.slow
def test_failed_job_reports_status_and_message(merge_cfg, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    _, path = merge_cfg
    out = submit_merge(
        ray_cluster["dashboard"],
        ["--config", str(path), "--adapter-name", "gamma"],
        working_dir=str(ROOT),
        follow=False,
        timeout_s=300,
    )
    assert out.status == "FAILED"
    assert "no published expert named 'gamma'" in out.logs
