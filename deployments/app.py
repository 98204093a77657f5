"""The one typed app builder: ``deployments.app:build_app`` turns the deployment config into the graph.

    Gateway (ingress) --> MergedModel[<adapter>]   one binding per enabled merged adapter
                      \\-> FullModel[<name>]        one per further full model (config ``models``)
                      \\-> MergedSlot-<k>           promotion slots, assigned at runtime
                      \\-> DynamicLoRA              base model + LRU of adapters + routing adapter
                      \\-> PromotionController      with promotion on: hot adapters into the slots

``serve run config/serve.yaml`` and KubeRay's ``serveConfigV2`` both call it with ``args.config``. The
config is validated once, here; each deployment is bound with its typed settings
(:mod:`deployments.settings`). Live settings are each deployment's user_config: the Serve config
carries them; a whole config passed as args (``serve run deployments.app:build_app config=...``)
supplies them itself.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from deployments.gateway.service import GatewayIngress
from deployments.models.dynamic import DynamicLoRA
from deployments.models.merged import FullModel, MergedModel
from deployments.promotion.autoscaling import SLOT_POLICY
from deployments.promotion.controller import CONTROLLER_NAME, PromotionController
from deployments.promotion.slots import MergedSlot
from deployments.settings import (
    DynamicSettings,
    FullModelSettings,
    GatewaySettings,
    MergedSettings,
    PromotionSettings,
    SlotSettings,
)
from moe_core.config import DeploymentConfig, LiveSettings, ScalingConfig

__all__ = [
    "CONTROLLER_NAME",
    "DYNAMIC_NAME",
    "GATEWAY_NAME",
    "AppArgs",
    "build_app",
    "merged_name",
    "model_name",
    "model_options",
    "slot_name",
]

GATEWAY_NAME = "Gateway"
DYNAMIC_NAME = "DynamicLoRA"
#: Every replica's environment. glibc raises its mmap threshold each time a large block is freed, so
#: the tensors, images and messages a replica allocates per request come from its heap afterwards and
#: fragment it: in the soak the in-use heap stayed flat while free-but-resident memory grew (dynamic
#: replica 60 -> 114 MB, gateway 14 -> 37 MB over 4,000 requests). A fixed threshold (glibc's default
#: starting value) keeps blocks of 128 KiB and more in mmap, returned to the system when freed.
REPLICA_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
#: Serve's logging for the app (JSON lines, an access line per request), and for deployments whose only
#: callers are internal periodic loops (no access line per call).
LOGGING: dict[str, Any] = {"encoding": "JSON", "log_level": "INFO", "enable_access_log": True}
QUIET_ACCESS_LOG: dict[str, Any] = LOGGING | {"enable_access_log": False}


def _actor_options(num_cpus: float, num_gpus: float = 0) -> dict[str, Any]:
    """A replica's resources and environment (read by glibc at process start, hence a runtime_env)."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "runtime_env": {"env_vars": dict(REPLICA_ENV)}}
    if num_gpus > 0:
        options["num_gpus"] = num_gpus
    return options


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] | str = Field(
        description="config/deployment.yaml as a mapping without its live fields (the generated Serve config, "
        "whose deployments carry them as user_config), or the path of a whole config file "
        "(`serve run deployments.app:build_app config=config/deployment.yaml`), whose live fields are used."
    )

    def deployment_config(self) -> tuple[DeploymentConfig, LiveSettings | None]:
        """Validated once: the config, and the live settings when the args hold them."""
        if isinstance(self.config, str):
            cfg = DeploymentConfig.from_file(self.config)
            return cfg, LiveSettings.of(cfg)
        return DeploymentConfig.from_static(self.config)


def merged_name(adapter: str) -> str:
    return f"Merged-{adapter}"


def model_name(name: str) -> str:
    """A further full model's deployment."""
    return f"Model-{name}"


def slot_name(slot: int) -> str:
    return f"MergedSlot-{slot}"


def _scaling(s: ScalingConfig, max_queued: int) -> dict[str, Any]:
    """Autoscaling, resources and backpressure of one model deployment: beyond ``max_queued`` waiting
    calls a caller gets Serve's BackPressureError at once (the gateway's 503/429), never a long wait."""
    return {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": max_queued,
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "initial_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.scaledown_window,
            "look_back_period_s": s.look_back_s,
            "metrics_interval_s": s.metrics_interval_s,
        },
        "ray_actor_options": _actor_options(s.cpu, s.gpu),
    }


def _slot_scaling(s: ScalingConfig, max_queued: int) -> dict[str, Any]:
    """A promotion slot's: the same, under a policy that keeps one replica while the slot is assigned
    (:mod:`deployments.promotion.autoscaling`; each slot replica reports whether it is)."""
    options = _scaling(s, max_queued)
    options["autoscaling_config"]["policy"] = {"policy_function": SLOT_POLICY}
    return options


def model_options(cfg: DeploymentConfig, name: str) -> dict[str, Any]:
    """A further model's deployment options: its own scaling and queue; on GPUs, the custom resource of its
    own worker group (:mod:`deployments.kube`), which only its replicas ask for."""
    m = next(m for m in cfg.models if m.name == name)
    options = _scaling(m, cfg.model_limits(name).max_queued_requests)
    if m.gpu > 0:
        options["ray_actor_options"]["resources"] = {model_resource(name): 1}
    return options


def model_resource(name: str) -> str:
    """The custom Ray resource a further model's GPU worker group offers (one per node)."""
    return f"model-{name}"


def _user_config(live: BaseModel | None) -> dict[str, Any]:
    return {"user_config": live.model_dump(mode="json")} if live is not None else {}


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Bind Gateway -> (one MergedModel per enabled merged adapter, one FullModel per enabled further model
    (config ``models``), DynamicLoRA, and with promotion on: ``promotion.slots`` MergedSlot deployments and
    the PromotionController that assigns them)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    cfg, live = parsed.deployment_config()
    merged = {
        a.name: serve.deployment(MergedModel)  # type: ignore[attr-defined]
        .options(name=merged_name(a.name), **_scaling(a, cfg.limits.max_queued_requests))
        .bind(MergedSettings.of(cfg, a.name))
        for a in cfg.merged_enabled
    }
    for m in cfg.models_enabled:  # further full models: the merged machinery, each its own deployment
        merged[m.name] = (
            serve.deployment(FullModel)  # type: ignore[attr-defined]
            .options(name=model_name(m.name), **model_options(cfg, m.name))
            .bind(FullModelSettings.of(cfg, m.name))
        )
    dynamic = None
    if cfg.dynamic.enabled:
        dynamic = (
            serve.deployment(DynamicLoRA)  # type: ignore[attr-defined]
            .options(
                name=DYNAMIC_NAME,
                **_scaling(cfg.dynamic, cfg.limits.max_queued_requests),
                **_user_config(live.dynamic if live else None),
            )
            .bind(DynamicSettings.of(cfg))
        )
    slots, controller = [], None
    if cfg.promotion.slots > 0 and dynamic is not None:  # slots are static; "enabled" is live
        slots = [
            serve.deployment(MergedSlot)  # type: ignore[attr-defined]
            .options(name=slot_name(k), **_slot_scaling(cfg.promotion, cfg.limits.max_queued_requests))
            .bind(SlotSettings.of(cfg, k))
            for k in range(cfg.promotion.slots)
        ]
        controller = (
            serve.deployment(PromotionController)  # type: ignore[attr-defined]
            .options(
                name=CONTROLLER_NAME,
                num_replicas=1,  # the one writer of the assignments
                # its callers are the gateways' reporting loops, each once a report interval: no access
                # line per call (its own decisions are logged); the app's format and level otherwise
                logging_config=QUIET_ACCESS_LOG,
                ray_actor_options=_actor_options(0),
                **_user_config(live.promotion if live else None),
            )
            .bind(PromotionSettings.of(cfg), slots)
        )
    return (
        serve.deployment(GatewayIngress)  # type: ignore[attr-defined]
        .options(
            name=GATEWAY_NAME,
            max_ongoing_requests=cfg.gateway.max_ongoing_requests,
            max_queued_requests=cfg.gateway.max_queued_requests,  # past it the proxy answers 503 at once
            ray_actor_options=_actor_options(0),
            **_user_config(live.gateway if live else None),
        )
        .bind(GatewaySettings.of(cfg), dynamic, merged, slots, controller)
    )


def user_configs(cfg: DeploymentConfig) -> dict[str, dict[str, Any]]:
    """Deployment name -> its user_config (the live fields of ``cfg``), for the generated Serve config."""
    live = LiveSettings.of(cfg)
    out = {GATEWAY_NAME: live.gateway.model_dump(mode="json")}
    if cfg.dynamic.enabled:
        out[DYNAMIC_NAME] = live.dynamic.model_dump(mode="json")
    if cfg.promotion.slots > 0 and cfg.dynamic.enabled:
        out[CONTROLLER_NAME] = live.promotion.model_dump(mode="json")
    return out
