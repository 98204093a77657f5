"""The runtime models derived from a config: what an engine needs (:class:`EngineSettings`), and each
deployment's live settings, its Serve user_config, which `serve deploy` changes in place."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

from pydantic import Field, ValidationError, model_validator

from moe_core.config.base import (
    BelowThreshold,
    ConfidenceThreshold,
    ConfigError,
    CooldownS,
    DemoteRps,
    DemoteWindowS,
    DenyAdapters,
    DynamicAdapters,
    FallbackToDynamic,
    MaxLoadedAdapters,
    PreferMerged,
    PromoteRps,
    PromoteWindowS,
    PromotionEnabled,
    StrictModel,
    describe,
)
from moe_core.config.sections import BaseModelConfig, EngineConfig, PromotionConfig, check_rates
from moe_core.vision import PixelBounds

if TYPE_CHECKING:
    from moe_core.config.schema import DeploymentConfig

__all__ = [
    "LIVE_FIELDS",
    "DynamicLive",
    "EngineSettings",
    "GatewayLive",
    "LiveModel",
    "LiveSettings",
    "PromotionLive",
]


class EngineSettings(StrictModel):
    """What an engine needs: the model, the prompt around each request, generation limits."""

    base_model: BaseModelConfig = Field(description="The base VLM.")
    system_prompt: str = Field(description="System prompt put before each request.")
    max_new_tokens: int = Field(ge=1, description="Tokens generated per request, at most.")
    min_pixels: int = Field(ge=1, description="Fewest pixels the model sees of an image.")
    max_pixels: int = Field(ge=1, description="Most pixels the model sees of an image.")
    max_prompt_tokens: int = Field(ge=1, description="Longest prompt in tokens, image tokens included.")
    max_completion_tokens: int = Field(default=512, ge=1, description="Most tokens a request may ask for.")
    kv: EngineConfig = Field(default_factory=EngineConfig, description="KV cache and step scheduling.")

    @property
    def bounds(self) -> PixelBounds:
        return PixelBounds(self.min_pixels, self.max_pixels)

    @property
    def image_factor(self) -> int:
        """Side of one image token in pixels: the patch size times the spatial merge (2)."""
        return self.base_model.image_patch_size * 2


class LiveModel(StrictModel):
    """A deployment's live settings: its Serve user_config, which `serve deploy` changes in place.

    Every field is required: a user_config missing one is refused naming it, never defaulted.
    """

    #: field -> (section, key) of :class:`DeploymentConfig` it comes from
    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {}

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> Self:
        return cls.model_validate({f: getattr(getattr(cfg, s), k) for f, (s, k) in cls.SOURCE.items()})

    @classmethod
    def from_user_config(cls, data: object, deployment: str) -> Self:
        """Validate a user_config; raise :class:`ConfigError` naming the deployment, field and value."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{deployment} user_config: {describe(e)}") from e


class GatewayLive(LiveModel):
    """The gateway's live settings."""

    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {
        "prefer_merged": ("gateway", "prefer_merged"),
        "fallback_to_dynamic": ("gateway", "fallback_to_dynamic"),
        "confidence_threshold": ("router", "confidence_threshold"),
        "below_threshold": ("router", "below_threshold"),
        "dynamic_adapters": ("dynamic", "adapters"),
    }
    prefer_merged: PreferMerged
    fallback_to_dynamic: FallbackToDynamic
    confidence_threshold: ConfidenceThreshold
    below_threshold: BelowThreshold
    dynamic_adapters: DynamicAdapters


class DynamicLive(LiveModel):
    """The dynamic deployment's live settings."""

    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {
        "adapters": ("dynamic", "adapters"),
        "max_loaded_adapters": ("dynamic", "max_loaded_adapters"),
    }
    adapters: DynamicAdapters
    max_loaded_adapters: MaxLoadedAdapters


class PromotionLive(LiveModel):
    """The promotion controller's live settings: its thresholds, and the switch that empties every slot."""

    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {
        "enabled": ("promotion", "enabled"),
        "promote_rps": ("promotion", "promote_rps"),
        "promote_window_s": ("promotion", "promote_window_s"),
        "demote_rps": ("promotion", "demote_rps"),
        "demote_window_s": ("promotion", "demote_window_s"),
        "cooldown_s": ("promotion", "cooldown_s"),
        "deny": ("promotion", "deny"),
    }
    enabled: PromotionEnabled
    promote_rps: PromoteRps
    promote_window_s: PromoteWindowS
    demote_rps: DemoteRps
    demote_window_s: DemoteWindowS
    cooldown_s: CooldownS
    deny: DenyAdapters

    @model_validator(mode="after")
    def _rates(self) -> Self:
        check_rates(self.demote_rps, self.promote_rps, prefix="")
        return self

    @classmethod
    def default(cls) -> PromotionLive:
        """The live fields of a config without a promotion section: promotion off."""
        section = PromotionConfig()
        return cls.model_validate({f: getattr(section, k) for f, (_, k) in cls.SOURCE.items()})


class LiveSettings(StrictModel):
    """Every deployment's live settings, derived from one config."""

    gateway: GatewayLive = Field(description="The gateway's user_config.")
    dynamic: DynamicLive = Field(description="The dynamic deployment's user_config.")
    promotion: PromotionLive = Field(
        default_factory=PromotionLive.default,
        description="The promotion controller's user_config; left out: promotion off.",
    )

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> LiveSettings:
        return cls(gateway=GatewayLive.of(cfg), dynamic=DynamicLive.of(cfg), promotion=PromotionLive.of(cfg))


#: Config fields `serve deploy` changes in place (Serve user_config), never part of the app's args.
LIVE_FIELDS: tuple[tuple[str, str], ...] = tuple(
    sorted({src for m in (GatewayLive, DynamicLive, PromotionLive) for src in m.SOURCE.values()})
)
