"""Soak: many requests over many adapters through the real Ray Serve app, with adapter churn in the LRU.

    python -m benchmarks.soak                      # 10,000 requests over 40 adapters, LRU 8, 8 clients
    python -m benchmarks.soak --requests 2000      # shorter

Random (non-zero) LoRA adapters on the embedded tiny model are published to a temporary storage root;
the app serves them all dynamically with an LRU smaller than their number, so adapters are loaded and
evicted all the time. Reports requests, errors by status, throughput, and the resident memory of every
replica between the first and the last thousand requests; writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from benchmarks.core import make_loras
from benchmarks.serve_bench import READY_TIMEOUT_S, _free_port
from moe_core.config import DeploymentConfig
from moe_core.storage.store import Storage

RESULTS = Path(__file__).resolve().parent / "results"


def replica_processes() -> dict[str, Any]:
    """Every Serve replica process on this machine by ``<app>:<deployment>:<pid>`` (Ray titles them
    ``ray::ServeReplica:<app>:<deployment>``, with the method running appended)."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info.get("cmdline") or [])
        if "ServeReplica:" in title:
            name = title.split("ServeReplica:", 1)[1].split()[0].split(".")[0]
            out[f"{name}:{proc.info['pid']}"] = proc
    return out


def _replica_rss_mb() -> dict[str, float]:
    """Resident memory of every Serve replica process on this machine."""
    import psutil

    out = {}
    for name, proc in replica_processes().items():
        try:
            out[name] = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return out


def soak(n_requests: int, n_adapters: int, lru: int, clients: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from deployments.app import build_app
    from moe_demo.screens import split

    root = Path(tempfile.mkdtemp(prefix="moe-soak-"))
    names = [f"soak-{i:02d}" for i in range(n_adapters)]
    cfg = DeploymentConfig.from_dict(
        {
            "storage": {"url": str(root / "storage"), "cache_dir": str(root / "cache")},
            "router": {"adapter": None, "labels": {}},
            "merged": {"adapters": []},
            "dynamic": {"adapters": names, "max_loaded_adapters": lru, "refresh_interval_s": 30.0},
        }
    )
    storage = Storage.from_config(cfg.storage)
    for name, path in zip(names, make_loras(cfg, root / "loras", n_adapters, rank=8), strict=True):
        storage.publish("expert", name, path)
    screens = split("heldout", 2)
    bodies = []
    for s in screens:
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        bodies.append({"image_b64": base64.b64encode(buf.getvalue()).decode(), "prompt": s.prompt})
    order = random.Random(0)
    plan = [(order.choice(names), order.randrange(len(bodies))) for _ in range(n_requests)]
    port = _free_port()
    statuses: Counter[int] = Counter()
    examples: list[str] = []  # the first few error responses, as sent
    rss: dict[str, dict[str, float]] = {}
    done = [0]
    lock = threading.Lock()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, num_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": cfg.model_dump(mode="json")}), name="soak", route_prefix="/")
        url = f"http://127.0.0.1:{port}/infer"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not requests.post(url, json=bodies[0] | {"expert": names[0]}, timeout=120).ok:
            if time.monotonic() > deadline:
                raise TimeoutError("the soak app never answered")
            time.sleep(0.5)
        next_item = iter(range(n_requests))

        def client() -> None:
            with requests.Session() as session:
                while True:
                    with lock:
                        i = next(next_item, None)
                    if i is None:
                        return
                    name, b = plan[i]
                    text = ""
                    try:
                        r = session.post(url, json=bodies[b] | {"expert": name}, timeout=120)
                        code, text = r.status_code, r.text if r.status_code != 200 else ""
                    except requests.RequestException as e:
                        code, text = 0, str(e)
                    with lock:
                        statuses[code] += 1
                        if text and len(examples) < 5:
                            examples.append(f"{code} {name}: {text[:300]}")
                        done[0] += 1
                        if done[0] in (1000, n_requests - 1000):
                            rss["first_1000" if done[0] == 1000 else "last_1000"] = _replica_rss_mb()
                        if done[0] % 1000 == 0:
                            print(
                                f"[soak] {done[0]}/{n_requests} requests, statuses {dict(statuses)}",
                                flush=True,
                            )

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        rss["end"] = _replica_rss_mb()
        stats = requests.get(f"http://127.0.0.1:{port}/stats", timeout=30).json()
    finally:
        serve.shutdown()
        ray.shutdown()
    first, last = rss.get("first_1000", {}), rss.get("last_1000", rss.get("end", {}))
    growth = {k: round(100 * (last[k] - v) / v, 2) for k, v in first.items() if k in last}
    return {
        "requests": n_requests,
        "adapters": n_adapters,
        "lru": lru,
        "clients": clients,
        "seconds": round(seconds, 1),
        "requests_per_s": round(n_requests / seconds, 1),
        "statuses": dict(statuses),
        "errors": n_requests - statuses[200],
        "error_examples": examples,
        "adapter_loads": stats.get("loads"),
        "adapter_evictions": stats.get("evictions"),
        "rss_mb_first_1000": {k: round(v, 1) for k, v in first.items()},
        "rss_mb_last_1000": {k: round(v, 1) for k, v in last.items()},
        "rss_growth_percent": growth,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--adapters", type=int, default=40)
    p.add_argument("--lru", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-growth", type=float, default=5.0, help="fail when a replica grows more (percent)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = soak(args.requests, args.adapters, args.lru, args.clients)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    worst = max(result["rss_growth_percent"].values(), default=0.0)
    return 0 if result["errors"] == 0 and worst <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
