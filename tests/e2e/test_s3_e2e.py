"""End to end on a real S3 endpoint (moto's standalone server on loopback): adapters published to a bucket,
merged by the merge job (a Ray task on the real local cluster), served merged and dynamic through real
Ray Serve on the tiny model, and a hot dynamic adapter promoted (merged by the controller's task, loaded
by a slot); every replica reads through the node cache, the promotion state is compare-and-swapped in
the bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from moe_core.config import DeploymentConfig, StorageConfig
from moe_core.probes import publish_probes
from moe_core.registry import deploy_adapter
from moe_core.storage.store import Storage
from tests.conftest import _free_port
from tests.e2e.test_serve_e2e import _deploy, _serve_file, _wait_ready
from tests.helpers import PROBES, screenshot

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PINNED, HOT = "alpha", "beta"  # merged by the merge job; promoted by traffic


def _b64(seed: int) -> str:
    import base64
    import io

    buf = io.BytesIO()
    screenshot(seed, (128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def s3_app(  # type: ignore[no-untyped-def]
    s3_endpoint: str,
    ray_cluster: dict[str, str],
    loras: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
):
    from tests.conftest import s3_test_env

    with pytest.MonkeyPatch.context() as mp:  # the endpoint's test credentials, for this module only
        s3_test_env(mp)
        yield from _s3_app(s3_endpoint, ray_cluster, loras, tmp_path_factory)


def _s3_app(  # type: ignore[no-untyped-def]
    s3_endpoint: str,
    ray_cluster: dict[str, str],
    loras: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
):
    from tests.s3_server import make_bucket

    tmp = tmp_path_factory.mktemp("s3-e2e")
    storage = StorageConfig(
        url=f"s3://{make_bucket(s3_endpoint)}/moe",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        cache_dir=str(tmp / "node-cache"),  # one node: every replica shares it
        keep_versions=3,
    )
    cfg = DeploymentConfig.from_dict(
        {
            "storage": storage.model_dump(mode="json"),
            "router": {"adapter": None},
            "merged": {"adapters": [{"name": PINNED, "cpu": 0.5}], "refresh_interval_s": 0.5},
            "dynamic": {"adapters": [HOT], "refresh_interval_s": 0.5, "cpu": 0.5},
            "limits": {"max_new_tokens": 8},
            "merge": {"num_probes": 4},
            "promotion": {
                "enabled": True,
                "slots": 1,
                "promote_rps": 1.0,
                "promote_window_s": 3,
                "demote_rps": 0.05,
                "demote_window_s": 600,
                "cooldown_s": 600,
                "report_interval_s": 0.5,
                "drain_s": 1,
            },
        }
    )
    st = Storage.from_config(cfg.storage)
    for name in (PINNED, HOT):  # publish: the registry's checks, then an atomic, verified version
        deploy_adapter(st, cfg, name, loras[name])
    publish_probes(st, cfg.merge.probe_set, PROBES)
    config_file = tmp / "deployment.yaml"
    config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    t0 = time.perf_counter()
    merge = subprocess.run(  # the merge job, as `make merge` runs it: a Ray task on the cluster
        [sys.executable, "-m", "merge_jobs", "--config", str(config_file), "--adapter-name", PINNED],
        capture_output=True,
        text=True,
        env=dict(os.environ, RAY_ADDRESS=ray_cluster["address"]),
        timeout=300,
    )
    merge_s = time.perf_counter() - t0
    assert merge.returncode == 0, merge.stderr[-3000:]
    port = _free_port()
    path = _serve_file([("s3app", "/", cfg)], port, tmp / "serve.yaml")
    t0 = time.perf_counter()
    _deploy(path, ray_cluster["dashboard"])
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, {"image_b64": _b64(0), "prompt": "Click the button", "expert": PINNED})
    ready_s = time.perf_counter() - t0
    yield {"url": url, "cfg": cfg, "storage": st, "merge": merge, "merge_s": merge_s, "ready_s": ready_s}
    subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "shutdown", "-y", "-a", ray_cluster["dashboard"]],
        capture_output=True,
    )


def _infer(url: str, expert: str, seed: int, **kw: Any) -> dict[str, Any]:
    body = {"image_b64": _b64(seed), "prompt": f"Click the button {seed}", "expert": expert, **kw}
    r = requests.post(f"{url}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_served_merged_and_dynamic_from_s3_then_promoted(s3_app) -> None:  # type: ignore[no-untyped-def]
    url, st, cfg = s3_app["url"], s3_app["storage"], s3_app["cfg"]
    merged_version = st.current_version("merged", PINNED)
    assert merged_version is not None and merged_version in s3_app["merge"].stdout
    meta = st.read_json("merged", PINNED, "merge_metadata.json")
    assert meta["greedy_agreement"] == 1.0 and meta["source_lora"].startswith(cfg.storage.url)

    # the merge job's model, served merged; the same adapter from the dynamic deployment: same answers
    for seed in range(3):
        merged = _infer(url, PINNED, seed)
        dynamic = _infer(url, PINNED, seed, prefer_merged=False)
        assert (merged["mode"], dynamic["mode"]) == ("merged", "dynamic")
        assert merged["merged_version"] == merged_version
        assert merged["task_output"] == dynamic["task_output"]
    want = [_infer(url, HOT, seed)["task_output"] for seed in range(4)]  # dynamic, before promotion

    # traffic on the dynamic adapter: the controller merges it (a task on the cluster, into the bucket),
    # the slot loads it through the node cache, the gateways route it there
    t0 = time.time()
    results: list[tuple[int, dict[str, Any]]] = []  # (screenshot seed, answer)
    stop = threading.Event()

    def client(k: int) -> None:
        n = k
        while not stop.is_set() and time.time() - t0 < 150:
            results.append((n % 4, _infer(url, HOT, n % 4)))
            n += 1
            if sum(r["mode"] == "merged" for _, r in results) >= 6:
                stop.set()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged_answers = [(seed, r) for seed, r in results if r["mode"] == "merged"]
    first = next((i for i, (_, r) in enumerate(results) if r["mode"] == "merged"), None)
    print(
        f"s3 e2e: merge job {s3_app['merge_s']:.1f} s, app ready {s3_app['ready_s']:.1f} s; {len(results)} "
        f"requests to {HOT}, {len(merged_answers)} answered merged (first after {first} dynamic ones, "
        f"{time.time() - t0:.1f} s)"
    )
    assert len(merged_answers) >= 6, "the hot adapter was not promoted within 150 s"
    assert all(r["task_output"] == want[seed] for seed, r in merged_answers)  # as dynamic answered (fp32)

    # the promotion's state and the merged model are in the bucket; the replicas read through the node cache
    data, revision = st.read_state("promotion")
    assert revision >= 2 and data["slots"][0]["adapter"] == HOT and data["slots"][0]["state"] == "ready"
    promoted = st.current_version("merged", HOT)
    assert promoted is not None
    adapters = {a["name"]: a for a in requests.get(f"{url}/adapters", timeout=10).json()}
    assert adapters[HOT]["serving"] == "promoted" and adapters[PINNED]["serving"] == "pinned"
    cached = sorted(p.name for p in (Path(cfg.storage.cache_dir) / "versions").iterdir())
    from moe_core.node_cache.files import content_key

    for kind, name in (("merged", PINNED), ("merged", HOT), ("expert", HOT)):
        files = st.manifest(kind, name, st.current_version(kind, name) or "")["files"]
        assert content_key(files) in cached, f"{kind} {name} not in the node cache"
