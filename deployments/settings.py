"""What each deployment is built with: typed static settings, derived once from the validated config.

The app builder validates the config once and binds these (frozen pydantic models) into the
deployments; none of them holds a live field, so nothing downstream can read a live value from
anywhere but the deployment's user_config (:mod:`moe_core.config`'s ``GatewayLive``, ``DynamicLive``, ``PromotionLive``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from moe_core.config import (
    AdapterName,
    ApiConfig,
    BatchingConfig,
    DeploymentConfig,
    EngineSettings,
    LimitsConfig,
    OutputGrammar,
    StorageConfig,
    StrictModel,
)
from moe_core.structured import Constraint

__all__ = [
    "DynamicSettings",
    "FullModelSettings",
    "FurtherModel",
    "GatewaySettings",
    "MergedSettings",
    "ModelSettings",
    "PromotionSettings",
    "SlotSettings",
]


class ModelSettings(StrictModel):
    """A deployment that holds a model: the engine, its storage, how it batches."""

    engine: EngineSettings = Field(description="Model and generation settings.")
    storage: StorageConfig = Field(description="Shared storage the deployment reads from.")
    batching: BatchingConfig = Field(description="Batch forming and storage refresh.")
    max_batch_size: int = Field(ge=1, description="Most requests decoding at once (rows of one forward).")
    max_queued_requests: int = Field(ge=0, description="Requests queued beyond those; more get a 503.")
    outputs: dict[AdapterName, OutputGrammar] = Field(
        default_factory=dict, description="Each expert's declared answer grammar (config `outputs`)."
    )

    def output_constraint(self, adapter: str | None) -> Constraint | None:
        """The grammar ``adapter``'s answers follow when a request brings none (None: free text)."""
        grammar = self.outputs.get(adapter) if adapter is not None else None
        return grammar.constraint(adapter) if grammar is not None and adapter is not None else None

    @staticmethod
    def common(cfg: DeploymentConfig, section: BatchingConfig) -> dict[str, Any]:
        """The model-deployment fields of ``cfg``, batching as its ``section`` (merged or dynamic) says
        (already validated with the config: taken as it is)."""
        batching = BatchingConfig.model_construct(
            **section.model_dump(include=set(BatchingConfig.model_fields))
        )
        return {
            "engine": cfg.engine_settings,
            "storage": cfg.storage,
            "batching": batching,
            "max_batch_size": cfg.limits.max_batch_size,
            "max_queued_requests": cfg.limits.max_queued_requests,
            "outputs": dict(cfg.outputs),
        }


class DynamicSettings(ModelSettings):
    router: AdapterName | None = Field(description="The routing adapter; None disables routing.")
    router_prompt: str = Field(description="Prompt given to the routing adapter with the image.")
    merged: tuple[AdapterName, ...] = Field(
        description="Merged adapters: served here too, as their fallback (beside the live dynamic list)."
    )
    max_lora_rank: int = Field(ge=1, description="Rank of the LoRA slots; higher-rank adapters are refused.")
    adapter_wait_s: float = Field(
        gt=0, description="Longest a load waits for room in the adapter LRU before its request gets a 503."
    )

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> DynamicSettings:
        return cls(
            **cls.common(cfg, cfg.dynamic),
            router=cfg.router.adapter,
            router_prompt=cfg.router.prompt,
            max_lora_rank=cfg.dynamic.max_lora_rank,
            adapter_wait_s=cfg.dynamic.adapter_wait_s,
            merged=tuple(a.name for a in cfg.merged.adapters),
        )


class MergedSettings(ModelSettings):
    adapter: AdapterName = Field(description="The adapter whose merged model this deployment serves.")

    @classmethod
    def of(cls, cfg: DeploymentConfig, adapter: str) -> MergedSettings:
        return cls(**cls.common(cfg, cfg.merged), adapter=adapter)


class FullModelSettings(ModelSettings):
    """A further full model (config ``models``): its own checkpoint, system prompt and limits."""

    name: AdapterName = Field(description="The model's name in the API.")
    from_storage: bool = Field(
        description="Load the version published in storage under merged/<name>/ (else the checkpoint "
        "``engine.base_model`` names, once)."
    )

    @classmethod
    def of(cls, cfg: DeploymentConfig, name: str) -> FullModelSettings:
        m = next(m for m in cfg.models if m.name == name)
        limits = cfg.model_limits(name)
        common = cls.common(cfg, cfg.merged) | {
            "engine": cfg.model_engine_settings(name),
            "max_batch_size": limits.max_batch_size,
            "max_queued_requests": limits.max_queued_requests,
        }
        return cls(**common, name=name, from_storage=m.model is None)


class SlotSettings(ModelSettings):
    slot: int = Field(ge=0, description="The promotion slot this deployment is (MergedSlot-<slot>).")

    @classmethod
    def of(cls, cfg: DeploymentConfig, slot: int) -> SlotSettings:
        return cls(**cls.common(cfg, cfg.merged), slot=slot)


class PromotionSettings(StrictModel):
    """The promotion controller's static settings (its thresholds are live: ``PromotionLive``)."""

    slots: int = Field(ge=0, description="Promotion slots bound by the app builder.")
    pinned: tuple[AdapterName, ...] = Field(
        description="Adapters with their own merged deployment: never moved."
    )
    storage: StorageConfig = Field(description="Where the assignments and the merged models are stored.")
    interval_s: float = Field(gt=0, description="Seconds between decisions.")
    drain_s: float = Field(
        ge=0, description="Seconds between routing an adapter back to dynamic and freeing its slot."
    )
    replace_factor: float = Field(
        ge=1, description="How many times as busy a candidate must be to replace a promoted adapter."
    )
    load_timeout_s: float = Field(gt=0, description="Longest wait for a slot to load its merged model.")
    merge_timeout_s: float = Field(
        gt=0, description="Longest a promotion's merge task may run; then it is cancelled."
    )
    write_retry_s: float = Field(
        gt=0, description="How long a switch retries writing the assignments through storage errors."
    )
    merge_cpu: float = Field(ge=0, description="CPUs of a merge task.")
    merge_gpu: float = Field(ge=0, description="GPUs of a merge task.")
    config_json: str = Field(
        description="What a merge task (merge_jobs) needs of the config: base model, storage, prompt, limits, "
        "merge settings (no adapter lists: the app's static args hold placeholders for those live fields)."
    )

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> PromotionSettings:
        p = cfg.promotion
        return cls(
            slots=p.slots,
            pinned=tuple(a.name for a in cfg.merged.adapters),
            storage=cfg.storage,
            interval_s=p.interval_s,
            drain_s=p.drain_s,
            replace_factor=p.replace_factor,
            load_timeout_s=p.load_timeout_s or max(60.0, 10 * cfg.gateway.request_timeout_s),
            merge_timeout_s=p.merge_timeout_s,
            write_retry_s=p.write_retry_s,
            merge_cpu=cfg.merge.cpu,
            merge_gpu=cfg.merge.gpu,
            config_json=DeploymentConfig.from_dict(
                cfg.model_dump(
                    mode="json",
                    include={"version", "base_model", "storage", "system_prompt", "limits", "merge"},
                )
            ).model_dump_json(),
        )


class FurtherModel(StrictModel):
    """What the gateway knows of a further full model: its limits, and its checkpoint when not published."""

    limits: LimitsConfig = Field(description="Its request limits (its own over the top-level ones).")
    checkpoint: str | None = Field(description="The Hugging Face id or folder it loads; None: from storage.")
    request_timeout_s: float | None = Field(
        description="Longest wait for a whole answer; None: the gateway's."
    )


class GatewaySettings(StrictModel):
    labels: dict[int, AdapterName] = Field(description="Router label ids and the adapters they select.")
    merged_disabled: tuple[AdapterName, ...] = Field(
        description="Merged adapters whose deployment is disabled: the dynamic deployment serves them."
    )
    limits: LimitsConfig = Field(description="Request limits checked at the gateway.")
    image_factor: int = Field(ge=1, description="Side of one image token in pixels (patch x spatial merge).")
    request_timeout_s: float = Field(gt=0, description="Per-hop timeout for a request.")
    api: ApiConfig = Field(description="The OpenAI-compatible API: model names, image limits, API keys.")
    base_model_name: str = Field(description="The base model's id in the OpenAI-compatible API.")
    base_model_id: str = Field(description="The base model as the config names it (base_model.id).")
    storage: StorageConfig = Field(
        description="Shared storage: where /v1/models says each adapter is stored; the promotion "
        "assignments and the merged versions the gateway reads."
    )
    router: AdapterName | None = Field(description="The routing adapter; None: no routed model.")
    report_interval_s: float = Field(
        gt=0, description="Seconds between request-count reports to the controller."
    )
    models: dict[AdapterName, FurtherModel] = Field(
        default_factory=dict, description="Further full models (config ``models``) with a running deployment."
    )

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> GatewaySettings:
        enabled = tuple(a.name for a in cfg.merged_enabled)
        return cls(
            labels=dict(cfg.router.labels),
            merged_disabled=tuple(a.name for a in cfg.merged.adapters if a.name not in enabled),
            limits=cfg.limits,
            image_factor=cfg.engine_settings.image_factor,
            request_timeout_s=cfg.gateway.request_timeout_s,
            api=cfg.api,
            base_model_name=cfg.api_base_model_name,
            base_model_id=cfg.base_model.id,
            storage=cfg.storage,
            router=cfg.router.adapter,
            report_interval_s=cfg.promotion.report_interval_s,
            models={
                m.name: FurtherModel(
                    limits=cfg.model_limits(m.name),
                    checkpoint=m.model.id if m.model is not None else None,
                    request_timeout_s=m.request_timeout_s,
                )
                for m in cfg.models_enabled
            },
        )

    def for_model(self, name: str | None) -> GatewaySettings:
        """These settings with the limits of the model that answers ``name``: a further model's own, else
        the base's (the pipeline checks them)."""
        further = self.models.get(name) if name is not None else None
        limits = self.limits if further is None else further.limits
        return self if limits is self.limits else self.model_copy(update={"limits": limits})
