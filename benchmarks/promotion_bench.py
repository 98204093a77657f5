"""A skewed (Zipf) adapter mix through Ray Serve, with traffic-aware promotion off and on, side by side.

The same clients send the same mix over the dynamic adapters (the hottest ~half the traffic) to the app
built twice from one config: once with ``promotion.enabled: false``, once with one slot. With promotion
on, a warm-up runs until the hottest adapter is answered by its slot (the time it took is reported), then
both runs are measured for the same duration: throughput, and p50/p99 latency per request.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.core import Samples
from moe_core.config import DeploymentConfig

__all__ = ["promotion_benchmarks", "zipf_weights"]

logger = logging.getLogger(__name__)


def zipf_weights(n: int, s: float) -> list[float]:
    """Zipf's law over ranks 1..n: weight of rank k is 1/k^s, normalised."""
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _load(
    url: str,
    bodies: dict[str, list[dict[str, Any]]],
    weights: list[float],
    clients: int,
    seconds: float,
    seed: int,
) -> tuple[list[float], list[str], int]:
    """``clients`` closed-loop clients for ``seconds``: latencies, modes, failures."""
    names = list(bodies)
    lat: list[float] = []
    modes: list[str] = []
    failed = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        with requests.Session() as s:
            while time.monotonic() < stop:
                name = rng.choices(names, weights)[0]
                body = rng.choice(bodies[name])
                t = time.perf_counter()
                try:
                    r = s.post(f"{url}/infer", json=body, timeout=120)
                    ok, mode = r.ok, (r.json().get("mode", "") if r.ok else "")
                except requests.RequestException:
                    ok, mode = False, ""
                took = time.perf_counter() - t
                with lock:
                    if ok:
                        lat.append(took)
                        modes.append(mode)
                    else:
                        failed[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, modes, failed[0]


def promotion_benchmarks(
    cfg: DeploymentConfig,
    seconds: float = 40.0,
    clients: int = 4,
    s: float = 1.2,
    warmup_limit_s: float = 120.0,
) -> tuple[Samples, dict[str, Any]]:
    import ray
    from ray import serve

    from benchmarks.serve_bench import _free_port
    from deployments.app import build_app
    from moe_demo.build import build_demo
    from moe_demo.screens import split

    build_demo(cfg, Path(".cache/demo"), say=lambda _: None)
    names = list(cfg.dynamic.adapters)
    weights = zipf_weights(len(names), s)
    bodies = {
        n: [
            {"image_b64": _b64(x.image), "prompt": x.prompt, "expert": n}
            for x in split("heldout", 6, (n,), 600)
        ]
        for n in names
    }
    samples: Samples = {}
    figures: dict[str, Any] = {"zipf_mix": {n: round(w, 3) for n, w in zip(names, weights, strict=True)}}
    port = _free_port()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, num_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for mode in ("off", "on"):
            data = cfg.model_dump(mode="json")
            data["promotion"] |= {
                "enabled": mode == "on",
                "slots": max(1, cfg.promotion.slots),
                "promote_rps": 1.0,
                "promote_window_s": 5.0,
                "demote_rps": 0.2,
                "demote_window_s": 600.0,  # nothing is demoted while measuring
                "cooldown_s": 600.0,
            }
            run_cfg = DeploymentConfig.from_dict(data)
            state = Path(run_cfg.storage.url) / "state" / "promotion.json"
            state.unlink(missing_ok=True)
            shutil.rmtree(
                Path(run_cfg.storage.url) / "merged" / names[0], ignore_errors=True
            )  # merged by promotion
            serve.run(build_app({"config": run_cfg.model_dump(mode="json")}), name="zipf", route_prefix="/")
            _ready(url, bodies[names[0]][0])
            if mode == "on":
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < warmup_limit_s:
                    _, modes, _ = _load(url, bodies, weights, clients, 5.0, seed=1)
                    if modes.count("merged") > 0:
                        break
                figures["zipf_seconds_to_promoted"] = time.perf_counter() - t0
                figures["zipf_promoted"] = requests.get(f"{url}/adapters", timeout=10).json()
            lat, modes, failed = _load(url, bodies, weights, clients, seconds, seed=2)
            samples[f"zipf_latency_promotion_{mode}"] = lat
            figures[f"zipf_throughput_promotion_{mode}_req_per_s"] = len(lat) / seconds
            figures[f"zipf_failed_promotion_{mode}"] = failed
            figures[f"zipf_merged_share_promotion_{mode}"] = modes.count("merged") / max(1, len(modes))
            serve.delete("zipf")
            state.unlink(missing_ok=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return samples, figures


def _ready(url: str, body: dict[str, Any], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.post(f"{url}/infer", json=body, timeout=60).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no answer from {url} within {timeout_s:.0f} s")
