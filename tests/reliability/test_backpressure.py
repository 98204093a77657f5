"""Overload is refused fast (hardening issue, item 9): every deployment has a bounded queue, and each
replica's engine a bounded one of its own (moe_core.engine.scheduler, tested in tests/core/test_scheduler.py)."""

from __future__ import annotations

from typing import Any

from deployments.app import build_app
from moe_core.config import DeploymentConfig


def test_every_deployment_has_a_bounded_queue() -> None:
    cfg = DeploymentConfig.from_file("config/deployment.yaml")
    gateway: Any = build_app({"config": "config/deployment.yaml"})._bound_deployment
    assert gateway.max_queued_requests == cfg.gateway.max_queued_requests == 512
    assert gateway.max_ongoing_requests == cfg.gateway.max_ongoing_requests == 256
    models = [gateway.init_args[1], *gateway.init_args[2].values()]
    assert len(models) == 1 + len(cfg.merged_enabled)
    for app in models:
        assert app._bound_deployment.max_queued_requests == cfg.limits.max_queued_requests
        assert app._bound_deployment.max_ongoing_requests == 64
