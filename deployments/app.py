"""The one typed app builder: ``deployments.app:build_app`` turns the deployment config into the graph.

    Router (ingress) --> MergedModel[<adapter>]   one binding per enabled merged adapter
                     \\-> DynamicLoRA              base model + LRU of adapters + routing adapter

``serve run config/serve.yaml`` and KubeRay's ``serveConfigV2`` both call it with ``args.config``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from deployments.dynamic import DynamicLoRA
from deployments.merged import MergedModel
from deployments.router import Router
from moe_core.config import DeploymentConfig, MergedAdapterConfig

__all__ = ["DYNAMIC_NAME", "ROUTER_NAME", "AppArgs", "build_app", "merged_name"]

ROUTER_NAME = "Router"
DYNAMIC_NAME = "DynamicLoRA"
#: Ray's default of 5 ongoing requests throttles batching; the batched deployments take this many.
BATCHED_MAX_ONGOING = 64
ROUTER_MAX_ONGOING = 256


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(
        description="config/deployment.yaml as a mapping; its live fields may be left out (see serve_config)."
    )


def merged_name(adapter: str) -> str:
    return f"Merged-{adapter}"


def _autoscaling(min_replicas: int, max_replicas: int, downscale_delay_s: float) -> dict[str, Any]:
    return {
        "min_replicas": min_replicas,
        "initial_replicas": max(min_replicas, 1) if min_replicas > 0 else 0,
        "max_replicas": max_replicas,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 2.0,
        "downscale_delay_s": downscale_delay_s,
    }


def _resources(cpu: float, gpu: float) -> dict[str, Any]:
    return {"num_cpus": cpu, "num_gpus": gpu} if gpu > 0 else {"num_cpus": cpu}


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Bind Router -> (one MergedModel per enabled merged adapter, DynamicLoRA)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    cfg = DeploymentConfig.from_static(parsed.config)
    config = cfg.model_dump(mode="json")
    merged: dict[str, Application] = {}
    for a in cfg.merged_enabled:
        merged[a.name] = _bind_merged(a, config)
    dynamic = None
    if cfg.dynamic.enabled:
        d = cfg.dynamic
        dynamic = (
            serve.deployment(DynamicLoRA)  # type: ignore[attr-defined]
            .options(
                name=DYNAMIC_NAME,
                max_ongoing_requests=BATCHED_MAX_ONGOING,
                autoscaling_config=_autoscaling(d.min_replicas, d.max_replicas, d.scaledown_window),
                ray_actor_options=_resources(d.cpu, d.gpu),
                user_config=dynamic_user_config(cfg),
                health_check_period_s=10,
            )
            .bind(config)
        )
    return (
        serve.deployment(Router)  # type: ignore[attr-defined]
        .options(
            name=ROUTER_NAME,
            max_ongoing_requests=ROUTER_MAX_ONGOING,
            ray_actor_options={"num_cpus": 0},
            user_config=router_user_config(cfg),
        )
        .bind(config, dynamic, merged)
    )


def _bind_merged(a: MergedAdapterConfig, config: dict[str, Any]) -> Application:
    return (
        serve.deployment(MergedModel)  # type: ignore[attr-defined]
        .options(
            name=merged_name(a.name),
            max_ongoing_requests=BATCHED_MAX_ONGOING,
            autoscaling_config=_autoscaling(a.min_replicas, a.max_replicas, a.scaledown_window),
            ray_actor_options=_resources(a.cpu, a.gpu),
        )
        .bind(a.name, config)
    )


def router_user_config(cfg: DeploymentConfig) -> dict[str, Any]:
    return {
        "prefer_merged": cfg.gateway.prefer_merged,
        "fallback_to_dynamic": cfg.gateway.fallback_to_dynamic,
        "confidence_threshold": cfg.router.confidence_threshold,
        "below_threshold": cfg.router.below_threshold,
        "dynamic_adapters": list(cfg.dynamic.adapters),
    }


def dynamic_user_config(cfg: DeploymentConfig) -> dict[str, Any]:
    return {
        "adapters": list(cfg.dynamic.adapters),
        "max_loaded_adapters": cfg.dynamic.max_loaded_adapters,
        "max_batch_size": cfg.limits.max_batch_size,
        "batch_wait_timeout_s": cfg.dynamic.batch_wait_timeout_s,
    }
