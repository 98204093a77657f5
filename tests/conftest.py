"""Session fixtures: the real tiny Qwen3-VL and small real LoRA adapters trained-by-construction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from moe_core.config import DeploymentConfig, StorageConfig
from tests.helpers import make_lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from moe_core.tiny import build_tiny_model

    return build_tiny_model()


@pytest.fixture
def cfg(tmp_path: Path, tiny_path: Path) -> DeploymentConfig:
    """A config on the built-in tiny model with storage in a fresh temporary folder."""
    return DeploymentConfig.from_dict(
        {
            "storage": {"url": str(tmp_path / "storage"), "keep_versions": 2},
            "router": {"adapter": "router", "labels": {0: "alpha", 1: "beta"}},
            "merged": {"adapters": [{"name": "alpha"}]},
            "dynamic": {"adapters": ["beta", "gamma"]},
        }
    )


@pytest.fixture(scope="session")
def loras(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> dict[str, Path]:
    """Three random (non-zero) LoRA adapters on the tiny model; 'gamma' also adapts lm_head."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "alpha": make_lora(root / "alpha", seed=1),
        "beta": make_lora(root / "beta", seed=2),
        "gamma": make_lora(root / "gamma", seed=3, lm_head=True),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real local Ray cluster (`ray start --head`, job server on), shared by the session's slow tests."""
    import subprocess
    import sys
    import time

    import requests

    port, dash, metrics = _free_port(), _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("ray")
    bin_dir = str(Path(sys.executable).parent)  # job entrypoints run `python` from this venv
    from tests.s3_server import TEST_ENV

    env = dict(
        os.environ,
        **TEST_ENV,  # the loopback S3 endpoint's test credentials (tests/s3_server.py), for jobs and replicas
        RAY_metrics_report_interval_ms="1000",  # metrics reach the export port within seconds
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    ray_bin = str(Path(bin_dir) / "ray")
    cmd = [
        ray_bin,
        "start",
        "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--num-cpus=6",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        f"--metrics-export-port={metrics}",
        # its own agent port: a free port picked above may be the agent's default (52365) otherwise
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"{dashboard}/api/version", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    os.environ["RAY_ADDRESS"] = address
    yield {
        "address": address,
        "dashboard": dashboard,
        "metrics": f"http://127.0.0.1:{metrics}/metrics",
        "logs": temp,
    }
    os.environ.pop("RAY_ADDRESS", None)
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="session")
def demo_cfg(tiny_path: Path) -> DeploymentConfig:
    """The shipped config with storage under .cache/test-demo: the demo built and the hot adapters merged.

    Kept between runs on one machine (the build is a no-op when nothing changed); built once in CI.
    """
    import subprocess
    import sys

    import yaml

    from merge_jobs.merge import merge_adapter

    root = ROOT / ".cache" / "test-demo"
    data = DeploymentConfig.from_file(ROOT / "config" / "deployment.yaml").model_dump(mode="json")
    data["storage"] = {"url": str(root / "storage"), "keep_versions": 3, "cache_dir": str(root / "cache")}
    data["dynamic"]["refresh_interval_s"] = 0.5
    # promotion has its own end-to-end test (test_promotion_e2e.py); here it would move the dynamic
    # adapters that other tests hammer onto a slot
    data["promotion"]["enabled"] = False
    cfg = DeploymentConfig.from_dict(data)
    # the build's own entry point, in a process of its own: it flushes subnormal floats to zero for speed
    # (moe_demo.flush_subnormals), which this process must not (hypothesis refuses to run under it).
    # Trained adapters and chandra's tiny OCR model are shared with `make serve` by build key.
    root.mkdir(parents=True, exist_ok=True)
    (root / "deployment.yaml").write_text(yaml.safe_dump(data))
    build = [sys.executable, "-m", "moe_demo", "--config", str(root / "deployment.yaml"), "build"]
    done = subprocess.run(
        [*build, "--work-dir", str(ROOT / ".cache" / "demo")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for a in cfg.merged_enabled:
        merge_adapter(cfg, a.name)
    return cfg


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real S3 endpoint on loopback for the session: moto's standalone server (tests/s3_server.py). This
    process's environment is left alone: a test that talks to the endpoint asks for ``s3_env``."""
    from tests.s3_server import moto_server

    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


def s3_test_env(mp: pytest.MonkeyPatch) -> None:
    """Put the loopback endpoint's test credentials in the AWS environment through ``mp`` (restored when
    it is undone): moto accepts any; the machine's own credentials, profile, session token and endpoint
    are hidden meanwhile, never sent to it nor mixed with the test keys."""
    from tests.s3_server import TEST_ENV

    for key in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        mp.delenv(key, raising=False)
    for key, value in TEST_ENV.items():
        mp.setenv(key, value)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loopback endpoint's test credentials in this process's AWS environment for one test."""
    s3_test_env(monkeypatch)


@pytest.fixture
def s3_settings(s3_endpoint: str, s3_env: None, tmp_path: Path) -> StorageConfig:
    """The storage section of a config on a fresh bucket of the loopback S3 endpoint."""
    from tests.s3_server import make_bucket

    return StorageConfig(
        url=f"s3://{make_bucket(s3_endpoint)}/root",
        endpoint_url=s3_endpoint,
        cache_dir=str(tmp_path / "node-cache"),
        keep_versions=2,
    )
