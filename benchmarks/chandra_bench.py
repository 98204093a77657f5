"""Pages per second through chandra-ocr's own client (``--only chandra``), at 1 and 8 concurrent pages.

The demo config's further model ``chandra`` (the tiny document-OCR model, built and published by the demo
build) is served alone on a local Ray Serve (no experts: the gateway and chandra's deployment), and
chandra-ocr's ``InferenceManager(method="vllm")`` is run unchanged in a subprocess with ``VLLM_API_BASE``
pointed at it, ``max_workers`` 1 and 8, on held-out synthetic pages. A page is one request of
chandra's layout prompt (1,668 tokens of the tiny tokenizer after 100 image tokens) answered with its
layout HTML (about 200 to 400 tokens).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_core.config import DeploymentConfig

__all__ = ["chandra_benchmarks"]

logger = logging.getLogger(__name__)

#: Pages per round, and the client's concurrent pages (its ``max_workers``).
PAGES = 16
CONCURRENCY = (1, 8)

_CLIENT = """
import json, sys, time
from PIL import Image
from chandra.model import InferenceManager
from chandra.model.schema import BatchInputItem
pages = [BatchInputItem(image=Image.open(p).convert("RGB"), prompt_type="ocr_layout") for p in sys.argv[3:]]
manager = InferenceManager(method="vllm")
t0 = time.perf_counter()
out = manager.generate(pages, max_workers=int(sys.argv[2]))
json.dump({"seconds": time.perf_counter() - t0, "errors": sum(o.error for o in out),
           "markdown": [o.markdown for o in out], "tokens": [o.token_count for o in out]}, open(sys.argv[1], "w"))
"""


def chandra_benchmarks(
    cfg: DeploymentConfig, pages: int = PAGES
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    import ray
    from ray import serve

    from benchmarks.serve_bench import _free_port
    from deployments.app import build_app
    from moe_demo import flush_subnormals
    from moe_demo.document import build_document_models
    from moe_demo.pages import page_split

    if not cfg.models_enabled:
        raise SystemExit(
            "--only chandra needs a config with a further model (config/deployment.yaml's chandra)"
        )
    flush_subnormals()  # as the build does, if it has to train the model
    build_document_models(cfg, Path(".cache/demo"), say=lambda _: None)
    data = cfg.model_dump(mode="json")
    data["merged"]["enabled"] = False  # chandra alone beside the gateway
    data["dynamic"]["enabled"] = False
    data["promotion"]["enabled"] = False
    data["router"]["labels"] = {}
    run_cfg = DeploymentConfig.from_dict(data)
    samples: dict[str, list[float]] = {}
    figures: dict[str, Any] = {}
    port = _free_port()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, num_cpus=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": run_cfg.model_dump(mode="json")}), name="chandra", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory(prefix="chandra-bench-") as tmp:
            files = []
            for p in page_split("heldout", pages, offset=800):
                files.append(Path(tmp) / f"page-{p.seed}.png")
                p.image.save(files[-1])
            env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")} | {
                "VLLM_API_BASE": f"{url}/v1"
            }
            _run(files[:2], 2, Path(tmp) / "warm.json", env)  # loads the model's first pages
            truth = [p.answer for p in page_split("heldout", pages, offset=800)]
            for workers in CONCURRENCY:
                out = _run(files, workers, Path(tmp) / f"c{workers}.json", env)
                samples[f"chandra_pages_c{workers}"] = [out["seconds"] / len(files)]
                figures[f"chandra pages/s, {workers} concurrent"] = round(len(files) / out["seconds"], 3)
                figures[f"chandra errors, {workers} concurrent"] = out["errors"]
                figures[f"chandra mean answer tokens, {workers} concurrent"] = round(
                    sum(out["tokens"]) / len(files), 1
                )
                figures[f"chandra pages answered exactly, {workers} concurrent"] = sum(
                    _exact(md, t) for md, t in zip(out["markdown"], truth, strict=True)
                ) / len(files)
        serve.delete("chandra")
    finally:
        serve.shutdown()
        ray.shutdown()
    return samples, figures


def _exact(markdown: str, answer: str) -> bool:
    from chandra.output import parse_markdown

    return bool(markdown == parse_markdown(answer))


def _run(files: list[Path], workers: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _CLIENT, str(out), str(workers), *map(str, files)], env=env, check=True
    )
    logger.info("chandra: %d pages at %d concurrent in %.1fs", len(files), workers, time.perf_counter() - t0)
    result: dict[str, Any] = json.loads(out.read_text())
    return result
