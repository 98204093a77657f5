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
    assert len(models) == 1 + len(cfg.merged_enabled) + len(cfg.models_enabled)
    further = {f"Model-{m.name}": cfg.model_limits(m.name) for m in cfg.models_enabled}
    for app in models:
        d = app._bound_deployment
        assert d.max_queued_requests == further.get(d.name, cfg.limits).max_queued_requests
        assert d.max_ongoing_requests == 64


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
