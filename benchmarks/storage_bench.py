"""Fetch throughput of a synthetic version (1 GB by default): the local S3 endpoint vs a local copy,
single-stream vs parallel ranged downloads.

    python -m benchmarks --only storage                  # 1 GB, 16 MiB ranged reads
    python -m benchmarks --only storage --storage-gb 0.02 --storage-part-mb 1  # the tests' smoke size

One version of four equal shards plus a config file, published once to a bucket of a loopback S3 endpoint
(moto's server, :mod:`moe_core.local_s3`) and once to a local root. Each fetch goes into an empty node
cache (:class:`~moe_core.node_cache.cache.NodeCache`: ranged reads, sha256 of every byte, written and fsynced),
from S3 and from the local root's files, with one stream and with ``streams``; rounds interleave the
ways. ``single`` is one stream: each file read as sequential ranged GETs of ``part_mb`` (not one GET per
file); ``parallel`` keeps ``streams`` of those ranges in flight for files larger than one part. The
figures ``*_ranged_reads`` and ``*_parallel_files`` say how each way's bytes came. ``in_place`` is what a
ReadWriteMany volume costs instead: the version read and verified where it lies. Throughput is the
version's size over the median fetch time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_core.config import StorageConfig
from moe_core.local_s3 import TEST_ENV, local_s3, make_bucket
from moe_core.node_cache.cache import NodeCache
from moe_core.storage.store import Storage

__all__ = ["storage_benchmarks"]

SHARDS = 4
_WRITE_CHUNK = 64 << 20


def _synthetic_version(folder: Path, size: int) -> Path:
    """``SHARDS`` files of random bytes adding up to ``size``, and a config file."""
    folder.mkdir(parents=True)
    per = size // SHARDS
    for i in range(SHARDS):
        with open(folder / f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors", "wb") as f:
            left = per
            while left:
                n = min(left, _WRITE_CHUNK)
                f.write(os.urandom(n))
                left -= n
    (folder / "config.json").write_text('{"synthetic": true}')
    return folder


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def storage_benchmarks(
    size_gb: float = 1.0, *, rounds: int = 2, streams: int = 8, part_mb: int = 16
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Samples (seconds per fetch) and figures (MB/s, and the parallel/single speed-ups)."""
    size = int(size_gb * 1e9)
    samples: dict[str, list[float]] = {}
    figures: dict[str, Any] = {
        "storage_version_bytes": size,
        "storage_streams": streams,
        "storage_part_mib": part_mb,
    }
    os.environ.update({k: os.environ.get(k, v) for k, v in TEST_ENV.items()})
    with tempfile.TemporaryDirectory(prefix="moe-storage-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        src = _synthetic_version(tmp / "src", size)
        with local_s3(tmp / "moto.log") as endpoint:
            bucket = make_bucket(endpoint, "moe-storage-bench")
            s3 = Storage.from_config(
                StorageConfig(
                    url=f"s3://{bucket}/bench",
                    endpoint_url=endpoint,
                    download_streams=streams,
                    download_part_mb=part_mb,
                    cache_dir=str(tmp / "unused"),
                )
            )
            local = Storage(str(tmp / "local-root"), cache_dir=tmp / "unused")
            t0 = time.perf_counter()
            version = s3.publish("merged", "bench", src)
            figures["storage_publish_s3_s"] = time.perf_counter() - t0
            local.publish("merged", "bench", src, version=version)
            manifest = s3.manifest("merged", "bench", version)
            ways = {
                "s3": (s3.fs, f"{s3.versions_dir('merged', 'bench')}/{version}"),
                "local": (local.fs, f"{local.versions_dir('merged', 'bench')}/{version}"),
            }
            for _ in range(rounds):
                for where, (fs, remote) in ways.items():
                    for label, n in (("single", 1), ("parallel", streams)):
                        cache_dir = tmp / f"cache-{where}-{label}"
                        cache = NodeCache(cache_dir, streams=n, part_bytes=part_mb << 20)
                        t0 = time.perf_counter()
                        cache.get(fs, remote, manifest).release()
                        samples.setdefault(f"storage_fetch_{where}_{label}", []).append(
                            time.perf_counter() - t0
                        )
                        assert cache.stats["bytes_downloaded"] >= size, cache.stats
                        # how the bytes came: ranged reads in all, and files read by parallel streams
                        figures[f"storage_{where}_{label}_ranged_reads"] = cache.stats["ranged_reads"]
                        figures[f"storage_{where}_{label}_parallel_files"] = cache.stats["parallel_files"]
                        shutil.rmtree(cache_dir)
                t0 = time.perf_counter()
                local.fetch("merged", "bench", version)  # in place: every byte read and hashed
                samples.setdefault("storage_fetch_local_in_place", []).append(time.perf_counter() - t0)
    for key, xs in samples.items():
        figures[f"{key.removeprefix('storage_fetch_')}_MB_per_s"] = size / 1e6 / _median(xs)
    for where in ("s3", "local"):
        single, parallel = (_median(samples[f"storage_fetch_{where}_{w}"]) for w in ("single", "parallel"))
        figures[f"storage_{where}_parallel_vs_single_speedup"] = single / parallel
    return samples, figures
