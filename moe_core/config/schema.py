"""The file schema: :class:`DeploymentConfig`, ``config/deployment.yaml`` as a whole, and the rules that
span its sections."""

from __future__ import annotations

from typing import Self

from pydantic import Field, ValidationError, ValidationInfo, model_validator

from moe_core.config.base import AdapterName, ConfigError, LiveFields, StrictModel, describe
from moe_core.config.model import BaseModelConfig, EngineConfig, LimitsConfig, MergeJobConfig, OutputGrammar
from moe_core.config.runtime import EngineSettings, LiveSettings
from moe_core.config.sections import (  # the sections composed here (__init__ re-exports them): not a duplicate
    ApiConfig,
    DynamicConfig,
    FullModelConfig,
    GatewayConfig,
    MergedAdapterConfig,
    MergedConfig,
    PromotionConfig,
    RouterConfig,
    check_rates,
)
from moe_core.config.storage import StorageConfig

__all__ = ["DEFAULT_SYSTEM_PROMPT", "LIVE_FIELDS", "DeploymentConfig"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a computer-use agent. You see a screenshot of the screen and control the mouse and "
    "keyboard. Answer with exactly one action, such as click(x, y)."
)


def _section(data: dict[str, object], name: str) -> dict[str, object]:
    section = data.get(name)
    return section if isinstance(section, dict) else {}


class DeploymentConfig(StrictModel):
    version: int = Field(default=1, ge=1, le=1, description="Schema version of this file.")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="The base VLM.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Shared storage.")
    system_prompt: str = Field(default=DEFAULT_SYSTEM_PROMPT, description="System prompt for experts.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Routing adapter settings.")
    merged: MergedConfig = Field(default_factory=MergedConfig, description="Merged deployments.")
    dynamic: DynamicConfig = Field(default_factory=DynamicConfig, description="Dynamic-LoRA deployment.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Routing between the two.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    merge: MergeJobConfig = Field(default_factory=MergeJobConfig, description="Merge job settings.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="KV cache memory and step scheduling of every model replica.",
    )
    api: ApiConfig = Field(default_factory=ApiConfig, description="The OpenAI-compatible API (/v1).")
    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig,
        description="Traffic-aware promotion of hot dynamic adapters into merged slots (off by default).",
    )
    models: list[FullModelConfig] = Field(
        default_factory=list,
        description="Further full models (chandra's OCR model, ...), each served by its own deployment with its "
        "own replicas, resources and limits, addressable by name beside the experts.",
    )
    outputs: dict[AdapterName, OutputGrammar] = Field(
        default_factory=dict,
        description="Each expert's or further model's answer grammar (regex, json_schema or choice), applied to its answers "
        "unless a request brings its own; experts not named answer free text.",
    )

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> Self:
        merged = [a.name for a in self.merged.adapters]
        for field, names in (
            ("merged.adapters", merged),
            ("dynamic.adapters", self.dynamic.adapters),
            ("promotion.deny", self.promotion.deny),
        ):
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    raise ValueError(f"{field}: duplicate adapter name {n!r}")
                seen.add(n)
        both = sorted(set(merged) & set(self.dynamic.adapters))
        if both:
            raise ValueError(
                f"adapters {both} are listed in both merged.adapters and dynamic.adapters; list each once "
                "(merged adapters are served dynamically as a fallback anyway)"
            )
        if self.router.adapter is not None and self.router.adapter in self.all_adapters:
            raise ValueError(
                f"router.adapter {self.router.adapter!r} is also listed as an expert; give it its own name"
            )
        names = [m.name for m in self.models]
        clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(self.all_adapters)))
        if self.router.adapter in names:
            clash.append(self.router.adapter)
        if clash:
            raise ValueError(f"models: names {clash} are used twice (models, adapters, router.adapter)")
        for m in self.models:
            self.model_limits(m.name)  # its limits over the top-level ones validate as a whole
        servable = set(self.all_adapters) | set(names)
        unknown = {k: v for k, v in self.router.labels.items() if v not in servable}
        live_elsewhere = bool(info.context and info.context.get("live_fields_external"))
        if unknown and not live_elsewhere:
            raise ValueError(
                f"router.labels {unknown} name no adapter in merged.adapters or dynamic.adapters "
                f"(known: {sorted(self.all_adapters)})"
            )
        stray = sorted(set(self.outputs) - servable)
        if stray and not live_elsewhere:
            raise ValueError(
                f"outputs names {stray}, no adapter of merged.adapters or dynamic.adapters "
                f"(known: {sorted(self.all_adapters)})"
            )
        targets = list(self.router.labels.values())
        dup_targets = sorted({v for v in targets if targets.count(v) > 1})
        if dup_targets:
            raise ValueError(f"router.labels maps several labels to {dup_targets}")
        return self

    @model_validator(mode="after")
    def _promotion(self) -> Self:
        """Promotion needs somewhere to promote to, and the dynamic deployment to demote back to."""
        p = self.promotion
        check_rates(p.demote_rps, p.promote_rps, prefix="promotion.")
        if p.enabled and p.slots < 1:
            raise ValueError(
                f"promotion.enabled needs promotion.slots >= 1, got {p.slots}: promoted adapters are served "
                "by the slot deployments"
            )
        if p.enabled and not self.dynamic.enabled:
            raise ValueError(
                "promotion.enabled needs dynamic.enabled: adapters are promoted from, and demoted back to, "
                "the dynamic deployment"
            )
        return self

    @model_validator(mode="after")
    def _api_names(self) -> Self:
        """The /v1 model names must not shadow each other or an expert adapter."""
        base, routed = self.api_base_model_name, self.api.routed_model_name
        if routed == base:
            raise ValueError(
                f"api.routed_model_name {routed!r} is also the base model's name; give it another name"
            )
        for field, name in (("api.routed_model_name", routed), ("api.base_model_name", base)):
            if name in self.all_adapters or name in {m.name for m in self.models}:
                raise ValueError(f"{field} {name!r} is also an expert's or a model's name; rename one")
        return self

    @property
    def api_base_model_name(self) -> str:
        """The base model's id in the OpenAI-compatible API."""
        return self.api.base_model_name or self.base_model.id

    def static_dump(self) -> dict[str, object]:
        """The config without its live fields: the app's args (live fields travel as user_config)."""
        data = self.model_dump(mode="json")
        for section, key in LIVE_FIELDS:
            data[section].pop(key)
        for empty in ("outputs", "models"):  # left out when empty, as in a config file
            if not data[empty]:
                del data[empty]
        return data

    @classmethod
    def from_static(cls, data: dict[str, object]) -> tuple[DeploymentConfig, LiveSettings | None]:
        """Validate the app's args: a :meth:`static_dump` (no live field), or a whole config (every one).

        Returns the config and, for a whole config, its live settings. For a static dump the returned
        config's live fields hold placeholders: live values reach a deployment only as its user_config.
        A mapping with some live fields but not all is refused naming the missing ones; a section absent
        altogether counts as one holding its defaults.
        """
        present = [(s, k) for s, k in LIVE_FIELDS if k in _section(data, s)]
        # a section left out altogether takes its defaults, as in a config file (configs from before a
        # section existed, such as promotion, stay valid); one that is there must hold all its live fields
        missing = [f"{s}.{k}" for s, k in LIVE_FIELDS if (s, k) not in present and s in data]
        if present and missing:
            raise ConfigError(
                f"app args: the config holds some live fields but not {missing}: pass a whole config, or "
                "none of them (the generated Serve config carries them as user_config)"
            )
        try:
            cfg = cls.model_validate(data, context={"live_fields_external": not present})
        except ValidationError as e:
            raise ConfigError(f"app args: {describe(e)}") from e
        return cfg, LiveSettings.of(cfg) if present else None

    @property
    def engine_settings(self) -> EngineSettings:
        """What an engine needs of this config."""
        return EngineSettings(
            base_model=self.base_model,
            system_prompt=self.system_prompt,
            limits=self.limits,
            kv=self.engine,
        )

    def model_limits(self, name: str) -> LimitsConfig:
        """The top-level limits with the further model ``name``'s own over them."""
        m = next(m for m in self.models if m.name == name)
        try:
            return LimitsConfig.model_validate(self.limits.model_dump() | m.limits)
        except ValidationError as e:
            raise ValueError(f"models.{name}.limits: {describe(e)}") from e

    def model_engine_settings(self, name: str) -> EngineSettings:
        """What the further model ``name``'s engine needs: its checkpoint (the base model's settings for one
        published in storage), its system prompt and its limits."""
        m = next(m for m in self.models if m.name == name)
        return EngineSettings(
            base_model=m.model or self.base_model,
            system_prompt=m.system_prompt,
            limits=self.model_limits(name),
            kv=self.engine,
        )

    @property
    def models_enabled(self) -> list[FullModelConfig]:
        return [m for m in self.models if m.enabled]

    @property
    def all_adapters(self) -> list[str]:
        """Expert adapters, merged first, in config order."""
        return [a.name for a in self.merged.adapters] + list(self.dynamic.adapters)

    @property
    def merged_enabled(self) -> list[MergedAdapterConfig]:
        return [a for a in self.merged.adapters if a.enabled] if self.merged.enabled else []


#: Config fields `serve deploy` changes in place (Serve user_config), never part of the app's args: the
#: fields the sections mark live (:class:`~moe_core.config.base.LiveFields`), as (section, key).
LIVE_FIELDS: tuple[tuple[str, str], ...] = tuple(
    sorted(
        (fragment.SECTION, key)
        for field in DeploymentConfig.model_fields.values()
        if isinstance(field.annotation, type) and issubclass(field.annotation, LiveFields)
        for fragment, key in field.annotation.declared()
    )
)
