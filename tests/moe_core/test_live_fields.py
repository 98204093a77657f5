"""Each live field is declared once, in its section's :class:`LiveFields` fragment: the live models are
built from those marks, and every mark reaches a live model."""

from __future__ import annotations

import pytest

from moe_core.config import (
    LIVE_FIELDS,
    ConfigError,
    DeploymentConfig,
    DynamicLive,
    GatewayLive,
    LiveFields,
    LiveModel,
    PromotionLive,
)
from moe_core.config.runtime import SameAs

MODELS: tuple[type[LiveModel], ...] = (GatewayLive, DynamicLive, PromotionLive)


def _section(name: str) -> type[LiveFields]:
    model = DeploymentConfig.model_fields[name].annotation
    assert isinstance(model, type) and issubclass(model, LiveFields), name
    return model


def test_every_marked_field_is_in_a_live_model_and_every_live_field_is_marked() -> None:
    sources = {src for m in MODELS for src in m.sources().values()}
    assert sources == set(LIVE_FIELDS)
    for m in MODELS:
        assert set(m.sources()) == set(m.model_fields), m.__name__  # no field without a mark


def test_a_live_model_field_is_its_section_field() -> None:
    """Type, constraints, default and description come from the one declaration in the section."""
    for m in MODELS:
        for field, (section, key) in m.sources().items():
            ours, theirs = m.model_fields[field], _section(section).model_fields[key]
            assert ours.annotation == theirs.annotation, field
            assert [x for x in ours.metadata if not isinstance(x, SameAs)] == theirs.metadata, field
            assert ours.description == theirs.description and ours.description, field
            assert ours.get_default(call_default_factory=True) == theirs.get_default(
                call_default_factory=True
            )


def test_each_fragment_names_the_section_that_inherits_it() -> None:
    for section, key in LIVE_FIELDS:
        fragments = [f for f, k in _section(section).declared() if k == key]
        assert [f.SECTION for f in fragments] == [section]


def test_live_models_take_the_config_values() -> None:
    cfg = DeploymentConfig.from_dict(
        {
            "gateway": {"prefer_merged": False},
            "router": {"confidence_threshold": 0.9, "below_threshold": "base"},
            "dynamic": {"adapters": ["calendar"], "max_loaded_adapters": 3},
            "promotion": {"cooldown_s": 7, "deny": ["calendar"]},
        }
    )
    gw = GatewayLive.of(cfg)
    assert (gw.prefer_merged, gw.confidence_threshold, gw.below_threshold) == (False, 0.9, "base")
    assert gw.dynamic_adapters == ["calendar"]
    assert DynamicLive.of(cfg).max_loaded_adapters == 3
    assert PromotionLive.of(cfg).cooldown_s == 7


def test_a_user_config_missing_fields_is_refused_naming_each() -> None:
    data = GatewayLive.of(DeploymentConfig()).model_dump()
    del data["prefer_merged"], data["dynamic_adapters"]
    with pytest.raises(ConfigError) as e:
        GatewayLive.from_user_config(data, "Gateway")
    assert "prefer_merged: Field required" in str(e.value)
    assert "dynamic_adapters: Field required" in str(e.value)
