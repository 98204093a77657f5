"""A second Ray node (hardening issue): the merged deployment on a worker node that is SIGKILLed under load.

A local two-node Ray cluster on this machine, the real app deployed on it with `serve deploy` (the embedded
demo, reduced: merged ``calendar`` on the worker node, every other expert dynamic on the head, no
promotion slots, so that every model replica is pinned to a node). Under 4
clients asking explicitly for ``calendar`` (merged) and ``login-window`` (dynamic), the worker node is
killed (its raylet and every process of the node, SIGKILL), left dead for 20 s, then started again with
the same resource. Requests may fail only as clean 503s (the gateway falls back to dynamic when the merged
call fails or times out), none hangs, and merged answers come back within 60 s of the restart.

Ports and flags. Two nodes on one machine must not share a port, so every port below is picked free when
the test starts (printed on the "two-node ports:" line) and the worker node restarts on its own ports:

    head    ray start --head --block --port=GCS --dashboard-host=127.0.0.1 --dashboard-port=DASH
            --ray-client-server-port=CLIENT --node-manager-port=NM1 --object-manager-port=OM1
            --dashboard-agent-listen-port=AGENT_HTTP1 --dashboard-agent-grpc-port=AGENT_GRPC1
            --runtime-env-agent-port=RUNTIME_ENV1 --metrics-export-port=METRICS1
            --min-worker-port=0 --max-worker-port=0 --num-cpus=2 --resources='{"head_node": 1}'
            --temp-dir=<its own dir> --disable-usage-stats
    worker  ray start --block --address=127.0.0.1:GCS --node-manager-port=NM2 --object-manager-port=OM2
            --dashboard-agent-listen-port=AGENT_HTTP2 --dashboard-agent-grpc-port=AGENT_GRPC2
            --runtime-env-agent-port=RUNTIME_ENV2 --metrics-export-port=METRICS2
            --min-worker-port=0 --max-worker-port=0 --num-cpus=1 --resources='{"worker_node": 1}'
            --temp-dir=<its own dir> --disable-usage-stats

``--min-worker-port=0 --max-worker-port=0`` lets the OS pick each worker's port (the default range
10002-19999 would be shared by both nodes and by any other Ray on the machine; a fixed client-server port
must lie outside the worker range or the head refuses to start). Both nodes run with RAY_AUTH_MODE=disabled.

The Serve config is the generated one with three changes for one machine: ``proxy_location: HeadOnly``
(a proxy per node would bind the same HTTP port twice), ``ray_actor_options.resources`` pinning
Merged-calendar to the worker (``worker_node: 0.01``; the head has no such resource) and the Gateway and
DynamicLoRA to the head (``head_node: 0.01``), and ``gateway.request_timeout_s: 10``: while the merged
replica is pending (no node has ``worker_node``), Serve queues calls to it; the gateway's per-hop timeout
is what turns them into a fallback to dynamic.

Stopping: each `ray start --block` runs in a session of its own; a node is every process of that session
(the raylet, its agents, the log monitor and the workers the raylet starts, which take their own process
group but keep the session). The test kills by session id, never with `ray stop`, which stops every Ray
on the machine (another cluster may be running beside this one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from deployments.serve_config import render
from moe_core.config import DeploymentConfig
from moe_demo.screens import split
from tests.conftest import _free_port
from tests.e2e.test_serve_e2e import _b64, _deploy, _wait_ready
from tests.helpers import without_models

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
#: The gateway's per-hop timeout in this test (the proxy's is twice it); a client waits longer than both.
HOP_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 3 * HOP_TIMEOUT_S + 5
OUTAGE_S = 20.0
MERGED_BACK_WITHIN_S = 60.0


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )


def _node_ports() -> list[str]:
    """The ports every node of one machine needs for itself."""
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]


def _start(args: list[str], temp: Path) -> subprocess.Popen[bytes]:
    """`ray start --block` in a session of its own: the session id (its pid) names the node's processes."""
    cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}", *args]
    with open(temp / "ray-start.out", "ab") as log:
        return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _session(sid: int) -> list[tuple[int, str]]:
    """(pid, name) of the live (not zombie) processes of session ``sid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state != "Z":
            out.append((int(entry), name))
    return out


def _kill_node(node: subprocess.Popen[bytes]) -> int:
    """SIGKILL every process of the node started by ``node`` (its raylet first); how many were killed."""
    killed: set[int] = set()
    for _ in range(50):
        procs = sorted(_session(node.pid), key=lambda p: p[1] != "raylet")
        if not procs:
            break
        for pid, _ in procs:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    node.wait(timeout=10)
    return len(killed)


_STATE = """
import json, sys
from ray.util import state
what, address, filters = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rows = getattr(state, "list_" + what)(address=address, filters=[tuple(f) for f in filters], raise_on_missing_output=False)
print(json.dumps([{k: getattr(r, k, None) for k in ("node_id", "resources_total", "pid")} for r in rows]))
"""


def _state(what: str, dashboard: str, filters: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """Ray's state API (``list_nodes``, ``list_actors``) on this test's cluster, asked from a fresh process:
    this one may already be connected to another cluster (the session's ``ray_cluster``, RAY_ADDRESS),
    and the state API then answers about that one."""
    env = {k: v for k, v in _env().items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", _STATE, what, dashboard, json.dumps(filters)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def _alive_nodes(dashboard: str) -> list[dict[str, Any]]:
    return _state("nodes", dashboard, [("state", "=", "ALIVE")])


def _wait_node(dashboard: str, resource: str, node: subprocess.Popen[bytes], timeout: float = 60) -> str:
    """The id of the alive node offering ``resource``, once the state API lists it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert node.poll() is None, f"`ray start` exited with {node.returncode}"
        try:
            for n in _alive_nodes(dashboard):
                if resource in (n["resources_total"] or {}):
                    return str(n["node_id"])
        except Exception:  # the dashboard is still starting
            pass
        time.sleep(0.5)
    raise AssertionError(f"no alive node with {resource!r} within {timeout:.0f}s")


def _two_node_serve_config(demo_cfg: DeploymentConfig, port: int, path: Path) -> DeploymentConfig:
    """The generated Serve config of the reduced demo: merged calendar pinned to the worker node."""
    data = without_models(demo_cfg.model_dump(mode="json"))
    data["merged"]["adapters"] = [a for a in data["merged"]["adapters"] if a["name"] == "calendar"]
    data["dynamic"]["adapters"] = [a for a in demo_cfg.all_adapters if a != "calendar"]  # the router's labels
    data["gateway"]["request_timeout_s"] = HOP_TIMEOUT_S
    if "promotion" in data:  # no promotion slots: every model replica here is pinned to a node
        data["promotion"] |= {"enabled": False, "slots": 0}
    cfg = DeploymentConfig.from_dict(data)
    doc = yaml.safe_load(render(cfg, host="127.0.0.1", port=port))
    doc["proxy_location"] = "HeadOnly"
    deployments = {d["name"]: d for d in doc["applications"][0]["deployments"]}
    pins = {
        "Gateway": {"num_cpus": 0, "resources": {"head_node": 0.01}},
        "DynamicLoRA": {"num_cpus": cfg.dynamic.cpu, "resources": {"head_node": 0.01}},
        "Merged-calendar": {"num_cpus": cfg.merged_enabled[0].cpu, "resources": {"worker_node": 0.01}},
    }
    for name, options in pins.items():
        deployments.setdefault(name, {"name": name})["ray_actor_options"] = options
    doc["applications"][0]["deployments"] = list(deployments.values())
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


def _wait_merged(url: str, body: dict[str, Any], timeout: float = 120) -> None:
    """Until calendar is answered by its merged deployment (not the dynamic fallback)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            r = requests.post(f"{url}/infer", json=body, timeout=CLIENT_TIMEOUT_S)
            last = r.json().get("mode") if r.ok else r.status_code
        except requests.RequestException as e:
            last = e
        if last == "merged":
            return
        time.sleep(1)
    raise AssertionError(f"merged calendar not answering within {timeout:.0f}s: {last}")


def _merged_replica(dashboard: str) -> dict[str, Any]:
    (actor,) = _state(
        "actors",
        dashboard,
        [("class_name", "=", "ServeReplica:moe:Merged-calendar"), ("state", "=", "ALIVE")],
    )
    return actor


def test_worker_node_killed_under_load_then_back(
    demo_cfg: DeploymentConfig, tmp_path_factory: pytest.TempPathFactory
) -> None:
    t_start = time.time()
    head_temp, worker_temp = tmp_path_factory.mktemp("rh"), tmp_path_factory.mktemp("rw")
    gcs, dash, http = _free_port(), _free_port(), _free_port()
    dashboard, url = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{http}"
    head_args = [
        "--head",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--ray-client-server-port={_free_port()}",
        *_node_ports(),
        "--num-cpus=2",
        '--resources={"head_node": 1}',
    ]
    worker_args = [
        f"--address=127.0.0.1:{gcs}",
        *_node_ports(),
        "--num-cpus=1",
        '--resources={"worker_node": 1}',
    ]
    print(f"two-node ports: head {' '.join(head_args)}; worker {' '.join(worker_args)}; http {http}")
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        nodes.append(_start(head_args, head_temp))
        _wait_node(dashboard, "head_node", nodes[0])
        worker = _start(worker_args, worker_temp)
        nodes.append(worker)
        worker_id = _wait_node(dashboard, "worker_node", worker)
        cfg = _two_node_serve_config(demo_cfg, http, head_temp / "serve.yaml")
        assert cfg.gateway.request_timeout_s == HOP_TIMEOUT_S
        _deploy(head_temp / "serve.yaml", dashboard)
        probe = split("heldout", 1, ("calendar",))[0]
        first = {"image_b64": _b64(probe), "prompt": probe.prompt, "expert": "calendar"}
        _wait_ready(url, first, timeout=120)
        _wait_merged(url, first)
        assert _merged_replica(dashboard)["node_id"] == worker_id  # the merged replica is on the worker node
        ready_s = time.time() - t_start

        screens = split("heldout", 2, ("calendar", "login-window"), offset=970)
        bodies = [{"image_b64": _b64(s), "prompt": s.prompt, "expert": s.kind} for s in screens]
        # (sent, took, expert, status, mode, fallback)
        results: list[tuple[float, float, str, int, str, bool]] = []
        lock = threading.Lock()
        restarted_at = [0.0]
        stop = [time.time() + 30 + OUTAGE_S + MERGED_BACK_WITHIN_S]

        def client(k: int) -> None:
            n = k
            with requests.Session() as session:
                while time.time() < stop[0]:
                    body = bodies[n % len(bodies)]
                    n += 1
                    t0 = time.time()
                    status, mode, fallback = 0, "", False
                    try:
                        r = session.post(f"{url}/infer", json=body, timeout=CLIENT_TIMEOUT_S)
                        status = r.status_code
                        if status == 200:
                            mode, fallback = r.json()["mode"], r.json()["fallback"]
                    except (requests.RequestException, ValueError):
                        pass
                    with lock:
                        results.append((t0, time.time() - t0, body["expert"], status, mode, fallback))
                        if restarted_at[0] and mode == "merged" and t0 > restarted_at[0]:  # merged again
                            stop[0] = min(stop[0], time.time() + 2.0)  # a little more, then stop

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(5.0)
        killed_at = time.time()
        n_killed = _kill_node(worker)
        time.sleep(OUTAGE_S)
        restarted_at[0] = time.time()
        worker = _start(worker_args, worker_temp)
        nodes.append(worker)
        _wait_node(dashboard, "worker_node", worker)
        node_back_s = time.time() - restarted_at[0]
        stop[0] = min(stop[0], restarted_at[0] + MERGED_BACK_WITHIN_S)
        for t in threads:
            t.join(timeout=MERGED_BACK_WITHIN_S + CLIENT_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in threads), "a client hung past its timeout"
    finally:
        for node in reversed(nodes):  # the worker nodes, then the head: only what this test started
            _kill_node(node)

    before = [r for r in results if r[0] + r[1] < killed_at]
    outage = [r for r in results if killed_at < r[0] < restarted_at[0]]  # sent while the node was gone
    failed = [(round(took, 1), expert, status) for _, took, expert, status, _, _ in results if status != 200]
    merged_back = [s + took for s, took, _, _, mode, _ in results if mode == "merged" and s > restarted_at[0]]
    back_s = min(merged_back) - restarted_at[0] if merged_back else None
    fallbacks = [took for _, took, expert, _, _, fallback in results if expert == "calendar" and fallback]
    dynamic_in_outage = [took for _, took, expert, *_ in outage if expert == "login-window"]
    slowest = max(took for _, took, *_ in results)
    print(
        f"two-node: {len(results)} requests sent ({sum(r[2] == 'calendar' for r in results)} calendar, merged; "
        f"{sum(r[2] == 'login-window' for r in results)} login-window, dynamic), {len(failed)} failed "
        f"(statuses {json.dumps(sorted({c for *_, c in failed}))}{f': {failed[:8]}' if failed else ''}); "
        f"worker node killed ({n_killed} processes) for {OUTAGE_S:.0f} s: {len(outage)} requests sent in the "
        f"outage, {len(fallbacks)} calendar answered by the dynamic fallback (slowest {max(fallbacks, default=0):.1f} s), "
        f"login-window slowest {max(dynamic_in_outage, default=0):.1f} s; slowest request {slowest:.1f} s; "
        f"worker node alive {node_back_s:.1f} s after its restart, merged back "
        f"{back_s if back_s is None else round(back_s, 1)} s after the restart; "
        f"cluster+deploy to first merged answer {ready_s:.1f} s, total {time.time() - t_start:.1f} s"
    )
    assert any(r[4] == "merged" for r in before), "merged calendar never answered before the kill"
    assert all(status == 503 for *_, status in failed), failed  # a clean 503, never a 5xx, 408 or hang
    assert {r[2] for r in outage if r[3] == 200} == {"calendar", "login-window"}  # the rest kept answering
    assert fallbacks  # calendar was answered by dynamic while its node was gone
    assert back_s is not None and back_s < MERGED_BACK_WITHIN_S, back_s
