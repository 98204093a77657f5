"""Traffic-aware promotion end to end: the real app on the embedded default, on the real local Ray
cluster, with promotion on (one slot, demo thresholds shortened for a test).

Skewed traffic to one dynamic adapter gets it merged (a merge task on the cluster), loaded by the slot
(scaled up from zero) and answered as merged, with every request answered exactly once and the merged
answers equal to the dynamic ones; once promoted, steady traffic is answered by the slot alone, quickly,
across over two of the slot's (shortened) autoscaler windows: Serve never scales an assigned slot to zero; a
restarted controller resumes the assignment from storage; when the traffic stops the adapter is demoted,
the slot freed and dynamic answers again. Pinned merged adapters never move.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import requests
import yaml

from moe_core.config import DeploymentConfig
from moe_demo.screens import split
from tests.conftest import _free_port
from tests.e2e.test_serve_e2e import _b64, _deploy, _serve_file, _settled, _total, _wait_ready
from tests.helpers import without_models

pytestmark = pytest.mark.slow

HOT = "login-window"  # a dynamic adapter
PINNED = "calendar"
WINDOWS = {"promote_window_s": 5, "demote_window_s": 8, "cooldown_s": 12, "drain_s": 1}
#: The slot's autoscaling, shortened: Serve sees the load its callers report every second, averaged over
#: 2 s, and scales a replica that looks idle away after a second under it. A window of its decisions is
#: the look-back and the delay: 3 s.
AUTOSCALING = {"scaledown_window": 1, "look_back_s": 2, "metrics_interval_s": 1}
WINDOW_S = AUTOSCALING["look_back_s"] + AUTOSCALING["scaledown_window"]
#: How long traffic holds on the promoted adapter before the controller is killed: over two windows.
HOLD_S = 2 * WINDOW_S + 1.0
#: Each client's pace: a request every 2 s, so 3 clients send steady traffic of about 1.5 req/s, above
#: promote_rps. Requests this short (tens of ms) keep the slot busy a small fraction of the time: Serve's
#: request-based autoscaling alone sees such a slot idle now and then, and scales it to zero.
PACE_S = 2.0
#: The longest a request may take once its adapter is promoted (a request that met a slot scaled to zero
#: waited for a replica to start and load: seconds).
MAX_WAIT_S = 2.0


class _Result(NamedTuple):
    sent: float
    done: float
    status: int
    mode: str
    answer: str
    screen: int
    fallback: bool


@pytest.fixture(scope="module")
def promo(demo_cfg: DeploymentConfig, ray_cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    data = without_models(demo_cfg.model_dump(mode="json"))
    data["promotion"] |= {
        "enabled": True,
        "slots": 1,
        "promote_rps": 1.0,
        "demote_rps": 0.2,
        **WINDOWS,
        **AUTOSCALING,
    }
    cfg = DeploymentConfig.from_dict(data)
    root = Path(cfg.storage.url)
    shutil.rmtree(root / "merged" / HOT, ignore_errors=True)  # the promotion has to merge it
    (root / "state" / "promotion.json").unlink(missing_ok=True)  # no assignment left by an earlier run
    port = _free_port()
    path = _serve_file([("promo", "/", cfg)], port, tmp_path_factory.mktemp("promo") / "serve.yaml")
    _deploy(path, ray_cluster["dashboard"])
    url = f"http://127.0.0.1:{port}"
    probe = split("heldout", 1, (HOT,))[0]
    _wait_ready(url, {"image_b64": _b64(probe), "prompt": probe.prompt, "expert": HOT})
    yield {"url": url, "cfg": cfg, "cluster": ray_cluster}
    subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "shutdown", "-y", "-a", ray_cluster["dashboard"]],
        capture_output=True,
    )


def _adapters(url: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in requests.get(f"{url}/adapters", timeout=10).json()}


def test_skewed_traffic_promotes_the_hot_adapter_and_its_cooling_demotes_it(promo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, metrics = promo["url"], promo["cluster"]["metrics"]
    screens = split("heldout", 12, (HOT,), offset=700)
    body = [{"image_b64": _b64(s), "prompt": s.prompt, "expert": HOT} for s in screens]
    before = _settled(metrics)
    # what the dynamic deployment answers: the merged slot must answer the same (fp32)
    want = [
        requests.post(f"{url}/infer", json=b | {"prefer_merged": False}, timeout=60).json()["task_output"]
        for b in body
    ]
    pinned = split("heldout", 1, (PINNED,), offset=700)[0]
    pinned_body = {"image_b64": _b64(pinned), "prompt": pinned.prompt, "expert": PINNED}
    assert requests.post(f"{url}/infer", json=pinned_body, timeout=60).json()["mode"] == "merged"
    assert _adapters(url)[HOT]["serving"] == "dynamic"

    results: list[_Result] = []
    lock = threading.Lock()
    t0 = time.time()
    stop = [t0 + 150.0]
    resumed = threading.Event()  # the controller was killed under this load and is back

    def client(k: int) -> None:
        n = k
        with requests.Session() as session:
            while time.time() < stop[0]:
                i = n % len(body)
                n += 1
                sent = time.time()
                try:
                    r = session.post(f"{url}/infer", json=body[i], timeout=60)
                    status, j = r.status_code, r.json() if r.ok else {}
                except requests.RequestException:
                    status, j = 0, {}
                with lock:
                    results.append(
                        _Result(
                            sent,
                            time.time(),
                            status,
                            j.get("mode", ""),
                            j.get("task_output", ""),
                            i,
                            bool(j.get("fallback")),
                        )
                    )
                    merged = [x.done for x in results if x.mode == "merged"]
                    if merged and time.time() - merged[0] > 8 and resumed.is_set():  # enough
                        stop[0] = min(stop[0], time.time())
                time.sleep(max(0.0, min(sent + PACE_S, stop[0]) - time.time()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    # once the gateway routes the adapter to its slot, the traffic holds for over two of the slot's
    # autoscaler windows: every request sent from then on must be answered by the slot (no fallback to
    # dynamic), none waiting over MAX_WAIT_S
    while _adapters(url)[HOT]["serving"] != "promoted" and time.time() < stop[0]:
        time.sleep(0.2)
    promoted_at = time.time()
    while time.time() < min(promoted_at + HOLD_S, stop[0]):
        time.sleep(0.2)
    # then the controller is SIGKILLed under the load: Serve restarts it and the new replica resumes the
    # assignment from storage (routing never depended on it being up)
    view = _status(promo, tmp_path)  # the controller's own account, before it is killed
    from ray.util.state import list_actors

    (victim,) = list_actors(
        address=promo["cluster"]["dashboard"],
        filters=[("class_name", "=", "ServeReplica:promo:PromotionController"), ("state", "=", "ALIVE")],
    )
    os.kill(int(victim.pid), signal.SIGKILL)
    t_kill = time.time()
    while True:
        restarted = _status(promo, tmp_path)
        if restarted["controller"] is not None:
            break
        assert time.time() - t_kill < 60, "the controller did not come back within 60 s"
        time.sleep(1.0)
    back_s = time.time() - t_kill
    resumed.set()
    for t in threads:
        t.join()
    first_merged = next((x.done for x in results if x.mode == "merged"), None)
    steady = [x for x in results if promoted_at < x.sent <= promoted_at + HOLD_S]  # each one, done or not
    failed = [x.status for x in results if x.status != 200]
    wrong = [(want[x.screen], x.answer) for x in results if x.mode == "merged" and x.answer != want[x.screen]]
    row = _adapters(url)[HOT]
    print(
        f"promotion: {len(results)} requests to {HOT} by 3 clients, {len(failed)} failed; first merged answer "
        f"{None if first_merged is None else round(first_merged - t0, 1)} s after the traffic began; "
        f"merged answers {sum(x.mode == 'merged' for x in results)}, differing from dynamic {len(wrong)}"
    )
    assert not failed, failed
    assert first_merged is not None and first_merged - t0 < 60, "not answered merged within 60 s"
    assert not wrong, wrong[:3]
    # promoted, under steady traffic: the slot alone answered (no fallback, the controller's restart
    # included), and over the first two autoscaler windows at once
    slow = [round(x.done - x.sent, 2) for x in steady if x.done - x.sent > MAX_WAIT_S]
    after = [x for x in results if x.sent > promoted_at]  # each one routed to the slot
    not_slot = [
        (round(x.sent - promoted_at, 1), x.mode, x.fallback)
        for x in after
        if x.mode != "merged" or x.fallback
    ]
    print(
        f"promotion: {len(after)} requests sent once the adapter was promoted, {len(not_slot)} not answered by "
        f"the slot; {len(steady)} in the first {HOLD_S:.0f} s ({HOLD_S / WINDOW_S:.1f} autoscaler windows), "
        f"{len(slow)} over {MAX_WAIT_S} s, longest {max((x.done - x.sent for x in steady), default=0):.2f} s"
    )
    assert len(steady) >= 6, steady  # about 1.5 req/s held
    assert not not_slot, (
        f"{len(not_slot)} of {len(after)} answers not from the slot (s after, mode, fallback): {not_slot[:8]}"
    )
    assert not slow, f"{len(slow)} of {len(steady)} requests waited over {MAX_WAIT_S} s: {slow[:10]}"
    assert (row["serving"], row["slot"]) == ("promoted", 0) and row["merged_version"] is not None, row
    assert _adapters(url)[PINNED]["serving"] == "pinned"
    # the controller's view: the parts of the switch, and its decision with the rates that made it
    sw = view["controller"]["switches"][HOT]
    print(
        f"promotion parts: decision {sw['decided_at'] - t0:.1f} s after the traffic began, merge {sw['merge_s']:.1f} s, "
        f"slot load {sw['load_s']:.1f} s, first merged answer {first_merged - sw['ready_at']:.1f} s after 'ready'"
    )
    assert sw["merged"] and view["stored"]["slots"][0]["state"] == "ready"
    assert any(d["kind"] == "promote" and "req/s" in d["reason"] for d in view["controller"]["decisions"])

    # every request generated exactly once: generations counted where they ran = requests sent
    sent = len(results) + len(want)
    after = _settled(metrics)
    ran = _total(after, "ray_moe_time_to_first_token_seconds_count", adapter=HOT) - _total(
        before, "ray_moe_time_to_first_token_seconds_count", adapter=HOT
    )
    print(f"promotion: {sent} requests sent, {ran:.0f} generations ran (dynamic and merged)")
    assert ran == sent
    assert _total(after, "ray_moe_promotion_slot_info", adapter=HOT, state="ready") == 1

    held = restarted["controller"]["slots"][0]
    print(f"promotion: the controller was back {back_s:.1f} s after its SIGKILL under load, holding {held}")
    assert held is not None and (held["adapter"], held["state"]) == (HOT, "ready"), restarted["controller"]

    # traffic stopped: demoted within its window (plus the cooldown since the promotion), the slot freed
    t_stop = max(x.done for x in results)
    while time.time() - t_stop < 60 and _adapters(url)[HOT]["serving"] != "dynamic":
        time.sleep(1.0)
    demoted = time.time() - t_stop
    print(
        f"promotion: demoted {demoted:.1f} s after the traffic stopped (demote window {WINDOWS['demote_window_s']} s)"
    )
    assert _adapters(url)[HOT]["serving"] == "dynamic", "not demoted within 60 s"
    r = requests.post(f"{url}/infer", json=body[0], timeout=60).json()
    assert (r["mode"], r["task_output"]) == ("dynamic", want[0]), r
    assert requests.post(f"{url}/infer", json=pinned_body, timeout=60).json()["mode"] == "merged"
    assert _adapters(url)[PINNED]["serving"] == "pinned"

    # flapping: bursts of traffic around the promotion threshold (about 1 req/s averaged over the window)
    # for three cooldowns: no adapter or slot switches twice within a cooldown
    t_flap = time.time()
    with requests.Session() as session:
        while time.time() - t_flap < 3 * WINDOWS["cooldown_s"]:
            burst = time.time()
            while time.time() - burst < 2.0:
                assert session.post(f"{url}/infer", json=body[1], timeout=60).status_code == 200
                time.sleep(0.3)
            time.sleep(2.0)
    decisions = [d for d in _status(promo, tmp_path)["controller"]["decisions"] if d["adapter"] == HOT]
    times = [d["at"] for d in decisions]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(
        f"promotion: flapping traffic for {time.time() - t_flap:.0f} s: {len(decisions)} switches of {HOT} "
        f"({[d['kind'] for d in decisions]}), gaps {[round(g, 1) for g in gaps]} s (cooldown {WINDOWS['cooldown_s']} s)"
    )
    assert all(g >= WINDOWS["cooldown_s"] for g in gaps), gaps

    # the controller's log holds its decisions, not an access line per gateway report (one a second)
    logs = list(
        Path(promo["cluster"]["logs"]).glob("session_*/logs/serve/replica_promo_PromotionController_*.log")
    )
    text = "".join(p.read_text(errors="replace") for p in logs)
    assert "promotion: promote " in text, logs
    assert "CALL report" not in text, [line for line in text.splitlines() if "CALL report" in line][:3]


def _status(promo: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """``python -m deployments.promotion.controller status --json``: the stored table and the controller's view."""
    conf = tmp_path / "deployment.yaml"
    conf.write_text(yaml.safe_dump(promo["cfg"].model_dump(mode="json")))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployments.promotion.controller",
            "status",
            "--config",
            str(conf),
            "--app",
            "promo",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, RAY_ADDRESS=promo["cluster"]["address"]),
    )
    assert cli.returncode == 0, cli.stderr
    view: dict[str, Any] = json.loads(cli.stdout)
    return view
