"""The runtime models derived from a config: what an engine needs (:class:`EngineSettings`), and each
deployment's live settings, its Serve user_config, which `serve deploy` changes in place."""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from moe_core.config.base import AdapterName, ConfigError, LiveFields, StrictModel, describe
from moe_core.config.model import BaseModelConfig, EngineConfig, LimitsConfig
from moe_core.config.sections import (
    DynamicLiveFields,
    GatewayLiveFields,
    PromotionConfig,
    PromotionLiveFields,
    RouterLiveFields,
    check_rates,
)
from moe_core.vision import PixelBounds

if TYPE_CHECKING:
    from moe_core.config.schema import DeploymentConfig

__all__ = [
    "DynamicLive",
    "EngineSettings",
    "GatewayLive",
    "LiveModel",
    "LiveSettings",
    "PromotionLive",
    "SameAs",
    "same_as",
]


class EngineSettings(StrictModel):
    """What an engine needs: the model, the prompt around each request, the request limits, the KV cache
    and step scheduling (the config's sections, passed whole)."""

    base_model: BaseModelConfig = Field(description="The base VLM.")
    system_prompt: str = Field(description="System prompt put before each request.")
    limits: LimitsConfig = Field(
        description="Request limits: tokens generated and asked for, the prompt's tokens, the image's pixels."
    )
    kv: EngineConfig = Field(description="KV cache and step scheduling.")

    @property
    def bounds(self) -> PixelBounds:
        return PixelBounds(self.limits.min_pixels, self.limits.max_pixels)

    @property
    def image_factor(self) -> int:
        """Side of one image token in pixels: the patch size times the spatial merge (2)."""
        return self.base_model.image_patch_size * 2


@dataclass(frozen=True)
class SameAs:
    """A live model field that is another name for a marked one (its ``fragment``'s ``key``)."""

    fragment: type[LiveFields]
    key: str


def same_as(fragment: type[LiveFields], key: str) -> Any:
    """The field ``key`` of ``fragment`` under another name in a live model: the same constraints,
    description and default, and the mark that says where its value comes from."""
    info = copy(fragment.model_fields[key])
    info.metadata = [*info.metadata, SameAs(fragment, key)]
    return info


class LiveModel(LiveFields):
    """A deployment's live settings: its Serve user_config, which `serve deploy` changes in place.

    Its fields are the marked live fields of the sections (:class:`LiveFields`) it inherits, and fields
    declared with :func:`same_as`. Every field is required: a user_config missing one is refused naming
    it, never defaulted.
    """

    @model_validator(mode="before")
    @classmethod
    def _every_field(cls, data: Any) -> Any:
        if isinstance(data, dict):
            missing = [f for f in cls.model_fields if f not in data]
            if missing:
                raise PydanticCustomError("missing", "; ".join(f"{f}: Field required" for f in missing))
        return data

    @classmethod
    def sources(cls) -> dict[str, tuple[str, str]]:
        """Field -> the (section, key) of :class:`DeploymentConfig` it comes from."""
        out = {name: (fragment.SECTION, name) for fragment, name in cls.declared()}
        for name, info in cls.model_fields.items():
            for mark in info.metadata:
                if isinstance(mark, SameAs):
                    out[name] = (mark.fragment.SECTION, mark.key)
        return out

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> Self:
        return cls.model_validate({f: getattr(getattr(cfg, s), k) for f, (s, k) in cls.sources().items()})

    @classmethod
    def from_user_config(cls, data: object, deployment: str) -> Self:
        """Validate a user_config; raise :class:`ConfigError` naming the deployment, field and value."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{deployment} user_config: {describe(e)}") from e


class GatewayLive(LiveModel, RouterLiveFields, GatewayLiveFields):
    """The gateway's live settings: the gateway's and the router's, and the dynamic adapters."""

    dynamic_adapters: list[AdapterName] = same_as(DynamicLiveFields, "adapters")


class DynamicLive(LiveModel, DynamicLiveFields):
    """The dynamic deployment's live settings."""


class PromotionLive(LiveModel, PromotionLiveFields):
    """The promotion controller's live settings: its thresholds, and the switch that empties every slot."""

    @model_validator(mode="after")
    def _rates(self) -> Self:
        check_rates(self.demote_rps, self.promote_rps, prefix="")
        return self

    @classmethod
    def default(cls) -> PromotionLive:
        """The live fields of a config without a promotion section: promotion off."""
        return cls.model_validate(PromotionConfig().model_dump(include=set(cls.model_fields)))


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
