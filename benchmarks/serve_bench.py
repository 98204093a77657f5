"""Through Ray Serve: /infer latency (merged, dynamic, routed) against a direct engine call on the same
request, and where a dynamic request's time goes by hop (proxy, gateway, handle, replica, engine)."""

from __future__ import annotations

import base64
import io
import logging
import socket
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.core import Samples
from benchmarks.serve_floor import floor_app
from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest
from moe_core.storage.store import Storage

#: How long the served app may take to answer its first requests (model loads, merged replicas).
READY_TIMEOUT_S = 300.0

__all__ = ["hops", "serve_benchmarks"]

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hops(server_timing: str, total_s: float) -> dict[str, float]:
    """Where one request's time went, by hop (seconds), from the gateway's Server-Timing header and the
    client's total: the HTTP proxy (and the network), the gateway itself, the handle calls (Serve's routing
    and the transfer both ways), the replica's method, and its engine."""
    ms = {p.split(";dur=")[0].strip(): float(p.split(";dur=")[1]) / 1e3 for p in server_timing.split(",")}
    return {
        "proxy": total_s - ms["gateway"],
        "gateway": ms["gateway"] - ms["hops"],
        "handle": ms["hops"] - ms["replica"],
        "replica": ms["replica"] - ms["engine"],
        "engine": ms["engine"],
    }


def serve_benchmarks(
    cfg: DeploymentConfig, images: list[Any], prompt: str, rounds: int
) -> tuple[Samples, dict[str, Any]]:
    import ray
    from ray import serve

    from deployments.app import build_app
    from merge_jobs.merge import merge_adapter
    from moe_demo.build import build_demo

    build_demo(cfg, Path(".cache/demo"), say=lambda s: None)
    merged_name = cfg.merged_enabled[0].name
    dynamic_name = cfg.dynamic.adapters[0]
    merge_adapter(cfg, merged_name)
    storage = Storage.from_config(cfg.storage)
    samples: Samples = {}
    figures: dict[str, Any] = {}
    port = _free_port()
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, num_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": cfg.model_dump(mode="json")}), name="bench", route_prefix="/")
        serve.run(floor_app(), name="floor", route_prefix="/floor")
        url = f"http://127.0.0.1:{port}/infer"
        floor_url = f"http://127.0.0.1:{port}/floor/infer"
        body = {"image_b64": _b64(images[0]), "prompt": prompt}
        deadline = time.monotonic() + READY_TIMEOUT_S
        for expert in (merged_name, dynamic_name, None):
            while not requests.post(url, json=body | ({"expert": expert} if expert else {}), timeout=120).ok:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the served app gave no answer for {expert or 'routed'} in {READY_TIMEOUT_S}s"
                    )
                time.sleep(0.5)
        figures["serve_run_to_first_answer_s"] = time.perf_counter() - t0
        direct = Engine.load(cfg.engine_settings, name="direct")
        direct.load_adapter(dynamic_name, storage.fetch("expert", dynamic_name)[0])
        req = GenerationRequest(images[0], prompt, dynamic_name)
        direct.generate([req])
        for _ in range(rounds):  # interleaved: direct, Serve's floor, HTTP dynamic, HTTP merged, HTTP routed
            t = time.perf_counter()
            direct.generate([req])
            samples.setdefault("direct_engine", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            requests.post(floor_url, json=body | {"expert": dynamic_name}, timeout=120).raise_for_status()
            samples.setdefault("serve_floor_two_deployments", []).append(time.perf_counter() - t)
            for key, extra in (
                ("infer_http_dynamic", {"expert": dynamic_name}),
                ("infer_http_merged", {"expert": merged_name}),
                ("infer_http_routed", {}),
            ):
                t = time.perf_counter()
                r = requests.post(url, json=body | extra, timeout=120)
                total = time.perf_counter() - t
                samples.setdefault(key, []).append(total)
                r.raise_for_status()
                if key == "infer_http_dynamic":
                    for hop, seconds in hops(r.headers["Server-Timing"], total).items():
                        samples.setdefault(f"hop_{hop}", []).append(seconds)
    finally:
        serve.shutdown()
        ray.shutdown()
    return samples, figures
