"""The sections of ``config/deployment.yaml`` that shape the Serve graph: routing, the merged and dynamic
deployments, promotion, the gateway, and the OpenAI-compatible API; the ones a model needs are in
:mod:`moe_core.config.model`, ``storage`` in :mod:`moe_core.config.storage`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from moe_core.config.base import AdapterName, LiveFields, StrictModel
from moe_core.config.model import BaseModelConfig, LimitsConfig

__all__ = [
    "ApiConfig",
    "BatchingConfig",
    "DynamicConfig",
    "DynamicLiveFields",
    "FullModelConfig",
    "GatewayConfig",
    "GatewayLiveFields",
    "MergedAdapterConfig",
    "MergedConfig",
    "PromotionConfig",
    "PromotionLiveFields",
    "RouterConfig",
    "RouterLiveFields",
    "ScalingConfig",
    "check_rates",
]

# Every setting is declared as Field(default, bounds, description=...) (STYLE.md 3), so the models' field
# blocks share a shape, here and across moe_core/config/: each declares other settings, none is a duplicate.


class RouterLiveFields(LiveFields):
    """The router section's live fields."""

    SECTION: ClassVar[str] = "router"
    confidence_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Below this routing confidence the below_threshold rule applies.",
    )
    below_threshold: Literal["base", "reject"] = Field(
        default="reject",
        description="When unsure: 'base' answers with the base model, 'reject' answers 422 with candidates.",
    )


class RouterConfig(RouterLiveFields):
    adapter: AdapterName | None = Field(
        default="router", description="Name of the routing adapter in storage; null disables routing."
    )
    labels: dict[int, AdapterName] = Field(
        default_factory=dict, description="Router label ids mapped to the adapter names they select."
    )
    prompt: str = Field(
        default="Which screen is this?", description="Prompt given to the routing adapter with the image."
    )


class ScalingConfig(StrictModel):
    """Resources and autoscaling of one Serve deployment."""

    gpu: float = Field(default=0.0, ge=0.0, description="GPUs per replica (0 on the CPU default).")
    cpu: float = Field(default=1.0, ge=0.0, description="CPUs per replica.")
    min_replicas: int = Field(default=0, ge=0, description="Autoscaling floor; 0 allows scale to zero.")
    max_replicas: int = Field(default=1, ge=1, description="Autoscaling ceiling.")
    scaledown_window: float = Field(
        default=300.0, ge=0.0, description="Seconds idle before a replica is removed (downscale delay)."
    )
    look_back_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Seconds of load the autoscaler averages over (Serve's look_back_period_s).",
    )
    metrics_interval_s: float = Field(
        default=10.0,
        gt=0.0,
        description="Seconds between the load reports of replicas and callers to the autoscaler (Serve's "
        "metrics_interval_s); a report is at most this old when the autoscaler decides.",
    )
    max_ongoing_requests: int = Field(
        default=64,
        ge=1,
        description="Calls a replica takes at once (Serve's max_ongoing_requests; Serve's default of 5 would "
        "throttle batching): the engine batches and queues them (limits.max_batch_size, "
        "limits.max_queued_requests).",
    )
    target_ongoing_requests: float = Field(
        default=8.0,
        gt=0.0,
        description="Ongoing calls per replica the autoscaler aims at (Serve's target_ongoing_requests).",
    )
    upscale_delay_s: float = Field(
        default=2.0,
        ge=0.0,
        description="Seconds the load must stay above the target before a replica is added (Serve's "
        "upscale_delay_s).",
    )

    @model_validator(mode="after")
    def _replicas(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class BatchingConfig(StrictModel):
    """How a model deployment looks for new versions in storage (batches form per decode step)."""

    refresh_interval_s: float = Field(
        default=5.0, ge=0.0, description="Minimum seconds between storage checks for a new version."
    )


class MergedAdapterConfig(ScalingConfig):
    name: AdapterName = Field(description="Adapter to serve from its merged, published copy.")
    enabled: bool = Field(default=True, description="Whether its merged deployment runs.")


class MergedConfig(BatchingConfig):
    enabled: bool = Field(default=True, description="Serve merged deployments at all.")
    adapters: list[MergedAdapterConfig] = Field(
        default_factory=list, description="Adapters merged into the base weights, one deployment each."
    )


class FullModelConfig(ScalingConfig):
    """A further full model served beside the base and its experts (``models``), by its own deployment:
    a checkpoint of its own (a fine-tune such as chandra), not an adapter."""

    name: AdapterName = Field(description="Its name in the API: `model` on /v1, `expert` on /infer.")
    enabled: bool = Field(default=True, description="Whether its deployment runs.")
    model: BaseModelConfig | None = Field(
        default=None,
        description="The checkpoint: a Hugging Face id or a local folder; left out, the version published in "
        "storage under merged/<name>/ (the embedded demo publishes its own there).",
    )
    system_prompt: str = Field(
        default="", description="System prompt put before each request (none by default)."
    )
    request_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Longest wait for a whole answer (a long page of OCR takes minutes); default the gateway's "
        "request_timeout_s. A stream waits that long between chunks.",
    )
    limits: dict[str, Any] = Field(
        default_factory=dict,
        description="Its own request limits: any field of the top-level `limits`, over that section's value.",
    )

    @field_validator("limits")
    @classmethod
    def _limit_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(LimitsConfig.model_fields))
        if unknown:
            raise ValueError(
                f"{unknown} are not fields of limits (known: {sorted(LimitsConfig.model_fields)})"
            )
        return v


class DynamicLiveFields(LiveFields):
    """The dynamic section's live fields."""

    SECTION: ClassVar[str] = "dynamic"
    adapters: list[AdapterName] = Field(
        default_factory=list, description="Adapters served only by the dynamic deployment."
    )
    max_loaded_adapters: int = Field(
        default=8, ge=1, description="LRU size: adapters resident in one replica at once."
    )


class DynamicConfig(ScalingConfig, BatchingConfig, DynamicLiveFields):
    enabled: bool = Field(default=True, description="Run the shared dynamic-LoRA deployment.")
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling floor; 0 allows scale to zero.")
    max_lora_rank: int = Field(
        default=32,
        ge=1,
        le=512,
        description="Largest LoRA rank served: each of the LRU's LoRA slots is this wide in every targeted layer "
        "(memory: LoRA slots x rank x sum of in+out features); adapters of higher rank are refused at deploy.",
    )
    adapter_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest a request for an adapter that is not loaded waits for room in the LRU (every "
        "loaded adapter serving running rows) before it is refused with a 503.",
    )


class PromotionLiveFields(LiveFields):
    """The promotion section's live fields: the controller's thresholds, and the switch that empties
    every slot."""

    SECTION: ClassVar[str] = "promotion"
    enabled: bool = Field(
        default=False,
        description="Give hot adapters a merged slot deployment and demote cold ones; off: every promoted "
        "adapter is demoted and the slots stay empty.",
    )
    promote_rps: float = Field(
        default=2.0,
        gt=0,
        description="Requests/s, averaged over promote_window_s, at or above which an adapter is promoted.",
    )
    promote_window_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds the promotion rate is averaged over; no promotion before the controller has "
        "seen this much traffic history, so a restart does not promote on a burst.",
    )
    demote_rps: float = Field(
        default=0.5,
        ge=0,
        description="Requests/s, averaged over demote_window_s, below which a promoted adapter is demoted; "
        "below promote_rps, so a rate between the two changes nothing (hysteresis).",
    )
    demote_window_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds the demotion rate is averaged over, and the least time an adapter stays promoted.",
    )
    cooldown_s: float = Field(
        default=300.0,
        ge=0,
        description="Seconds after a switch during which neither that adapter nor that slot switches again: "
        "a merge costs minutes of GPU time, so a rate hovering at a threshold must not flap.",
    )
    deny: list[AdapterName] = Field(
        default_factory=list, description="Adapters never promoted (demoted when they hold a slot)."
    )


class PromotionConfig(ScalingConfig, PromotionLiveFields):
    """Traffic-aware promotion: ``slots`` merged deployments whose adapter a controller picks by traffic.

    The slots are bound when the app is built (Serve cannot add deployments from inside the app), so
    ``slots`` and the scaling fields are static; the thresholds are live (the controller's user_config).
    """

    slots: int = Field(
        default=0,
        ge=0,
        description="Merged slot deployments bound at build time, each serving at most one promoted adapter.",
    )
    # same shape as PromotionLiveFields' fields, different settings: not a duplicate
    interval_s: float = Field(default=1.0, gt=0, description="Seconds between the controller's decisions.")
    report_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between each gateway's reports of its per-adapter request counts.",
    )
    drain_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds between routing a demoted adapter back to the dynamic deployment and freeing its "
        "slot, so requests already sent to the slot finish there.",
    )
    replace_factor: float = Field(
        default=2.0,
        ge=1.0,
        description="With every slot taken, a candidate replaces the coldest promoted adapter only when it is "
        "this many times as busy: a merge is too dear to swap two adapters of about the same traffic.",
    )
    load_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Longest wait for a slot to load its merged model; null: ten times "
        "gateway.request_timeout_s, at least 60.",
    )
    merge_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="Longest a promotion's merge task may run, then it is cancelled (an 8B fp32 merge and its "
        "verification take minutes on a GPU).",
    )
    write_retry_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a switch retries writing the assignments through storage errors.",
    )


class GatewayLiveFields(LiveFields):
    """The gateway section's live fields."""

    SECTION: ClassVar[str] = "gateway"
    prefer_merged: bool = Field(default=True, description="Send to the merged deployment when one is up.")
    fallback_to_dynamic: bool = Field(
        default=True, description="Answer from the dynamic deployment when the merged one fails."
    )


class GatewayConfig(GatewayLiveFields):
    request_timeout_s: float = Field(default=60.0, gt=0, description="Per-hop timeout for a request.")
    max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description="Requests one gateway replica handles at once (Serve's max_ongoing_requests).",
    )
    max_queued_requests: int = Field(
        default=512,
        ge=0,
        description="Requests queued for the gateway beyond max_ongoing_requests; past them the proxy answers "
        "503 at once (Serve's max_queued_requests).",
    )


#: An environment variable's name.
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: A host name, lower case, or a wildcard for its subdomains (``*.example.com``).
HOST_RE = r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"


class ApiConfig(StrictModel):
    """The OpenAI-compatible API (``/v1``): the model names it lists, image limits, and API keys."""

    base_model_name: str | None = Field(
        default=None,
        min_length=1,
        pattern=r"^\S+$",
        description="Model id under which /v1 lists and accepts the base model without an adapter; "
        "null: base_model.id.",
    )
    routed_model_name: str = Field(
        default="auto",
        min_length=1,
        pattern=r"^\S+$",
        description="Model id that lets the routing adapter choose the expert for each request's last "
        "screenshot (the below_threshold rule applies).",
    )
    max_images: int = Field(
        default=8, ge=1, le=64, description="Most images in one chat request, earlier screenshots included."
    )
    image_url_hosts: list[Annotated[str, Field(pattern=HOST_RE)]] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs the gateway fetches (exact names, or *.example.com for "
        "subdomains; redirects are not followed); empty: only data: URLs are accepted.",
    )
    image_fetch_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Time limit for fetching one image URL from an allowed host (size: limits.max_image_bytes).",
    )
    key_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_RE,
        description="Environment variable holding an API key. With key_env or key_file set, /v1/*, /infer, "
        "/adapters and /stats need `Authorization: Bearer <key>` (401 otherwise); null with key_file null: "
        "no keys.",
    )
    key_file: str | None = Field(
        default=None,
        min_length=1,
        description="File holding API keys, one per line ('#' comments and blank lines skipped), e.g. a "
        "mounted Kubernetes Secret; re-read when it changes, so keys rotate without a restart.",
    )

    @property
    def keys_required(self) -> bool:
        """Whether a key source is configured (requests then need a key)."""
        return self.key_env is not None or self.key_file is not None


def check_rates(demote_rps: float, promote_rps: float, prefix: str) -> None:
    """Hysteresis: with demote_rps >= promote_rps one steady rate would both promote and demote."""
    if demote_rps >= promote_rps:
        raise ValueError(
            f"{prefix}demote_rps ({demote_rps}) must be below {prefix}promote_rps ({promote_rps}), or an "
            "adapter at a steady rate would be promoted and demoted in turn"
        )
