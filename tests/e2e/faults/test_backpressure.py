"""Overload is refused fast (hardening issue, item 9): every deployment has a bounded queue, and each
replica's engine a bounded one of its own (moe_core.engine.scheduler, tested in tests/moe_core/test_scheduler.py)."""

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


def test_the_configured_serve_knobs_reach_the_deployments() -> None:
    data = DeploymentConfig.from_file("config/deployment.yaml").model_dump(mode="json")
    data["gateway"] |= {"max_ongoing_requests": 100, "max_queued_requests": 50}
    data["dynamic"] |= {
        "max_ongoing_requests": 12,
        "target_ongoing_requests": 3.0,
        "upscale_delay_s": 7.0,
        "adapter_wait_s": 4.0,
    }
    gateway: Any = build_app({"config": data})._bound_deployment
    assert (gateway.max_ongoing_requests, gateway.max_queued_requests) == (100, 50)
    dynamic = gateway.init_args[1]._bound_deployment
    scaling = dynamic._deployment_config.autoscaling_config
    assert dynamic.max_ongoing_requests == 12 and dynamic.init_args[0].adapter_wait_s == 4.0
    assert (scaling.target_ongoing_requests, scaling.upscale_delay_s) == (3.0, 7.0)
