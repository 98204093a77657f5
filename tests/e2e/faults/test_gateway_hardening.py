"""The gateway under slow or sleeping deployments (hardening issue, item 13): status endpoints answer
fast, never wake a deployment scaled to zero, and never hang."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from deployments.gateway.service import Gateway
from deployments.settings import GatewaySettings
from moe_core.config import DeploymentConfig, LiveSettings
from moe_core.storage.store import Storage


class SleepyHandle:
    """A handle whose every call takes ``delay`` seconds (a replica starting from zero, or a stuck one)."""

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, 0

    def __getattr__(self, method: str) -> Any:
        handle = self

        class _Method:
            def remote(self, *args: Any) -> asyncio.Task[Any]:
                handle.calls += 1

                async def run() -> Any:
                    await asyncio.sleep(handle.delay)
                    raise AssertionError("never answered in time")

                return asyncio.ensure_future(run())

        return _Method()


def _gateway(tmp_path: Path) -> tuple[Gateway, SleepyHandle, SleepyHandle, str]:
    cfg = DeploymentConfig.from_dict(
        {
            "storage": {"url": str(tmp_path / "s")},
            "router": {"adapter": "router", "labels": {0: "calendar", 1: "desktop"}},
            "merged": {"adapters": [{"name": "calendar"}, {"name": "desktop"}]},
        }
    )
    src = tmp_path / "m"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    version = Storage(cfg.storage.url).publish("merged", "calendar", src)
    merged, dynamic = SleepyHandle(30.0), SleepyHandle(30.0)
    g = Gateway(GatewaySettings.of(cfg), dynamic, {"calendar": merged, "desktop": merged})  # type: ignore[arg-type]
    g.reconfigure(LiveSettings.of(cfg).gateway.model_dump())
    return g, merged, dynamic, version


def test_adapters_reads_published_versions_without_calling_any_deployment(tmp_path: Path) -> None:
    g, merged, _, version = _gateway(tmp_path)

    async def go() -> Any:
        t0 = time.perf_counter()
        rows = await g.adapters()
        return rows, time.perf_counter() - t0

    rows, took = asyncio.run(go())
    assert merged.calls == 0  # a deployment scaled to zero stays at zero
    assert took < 2.0
    assert {r.name: r.merged_version for r in rows} == {"calendar": version, "desktop": None}


def test_stats_answers_503_when_the_dynamic_deployment_does_not(tmp_path: Path) -> None:
    g, _, dynamic, _ = _gateway(tmp_path)

    async def go() -> Any:
        t0 = time.perf_counter()
        response = await g.stats()
        return response, time.perf_counter() - t0

    response, took = asyncio.run(go())
    assert dynamic.calls == 1 and took < 5.0
    assert response.status_code == 503 and "no answer within" in json.loads(response.body)["error"]["message"]
