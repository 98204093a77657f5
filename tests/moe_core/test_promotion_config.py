"""The promotion section: off by default, validated like the rest, and its live fields carried as the
controller's user_config (never in the app's args)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moe_core.config import (
    LIVE_FIELDS,
    ConfigError,
    DeploymentConfig,
    DynamicLive,
    GatewayLive,
    LiveSettings,
    PromotionConfig,
    PromotionLive,
)

ROOT = Path(__file__).resolve().parents[2]
ON = {"enabled": True, "slots": 2}


def test_absent_section_means_off_and_shipped_configs_stay_valid() -> None:
    for name in ("deployment.yaml", "deployment.k8s.yaml"):
        DeploymentConfig.from_file(ROOT / "config" / name)
    assert DeploymentConfig.from_dict({"dynamic": {"adapters": ["calendar"]}}).promotion == PromotionConfig()
    p = DeploymentConfig().promotion
    assert (p.enabled, p.slots, p.min_replicas, p.promote_rps, p.demote_rps) == (False, 0, 0, 2.0, 0.5)
    assert LiveSettings.of(DeploymentConfig()).promotion == PromotionLive.default()


def test_enabled_promotion_loads() -> None:
    cfg = DeploymentConfig.from_dict(
        {"dynamic": {"adapters": ["calendar"]}, "promotion": {**ON, "deny": ["calendar"], "gpu": 1.0}}
    )
    assert cfg.promotion.slots == 2 and cfg.promotion.deny == ["calendar"] and cfg.promotion.gpu == 1.0


BAD: list[tuple[dict[str, Any], list[str]]] = [
    ({"promotion": {"demote_rps": 2.0}}, ["promotion.demote_rps (2.0)", "promotion.promote_rps (2.0)"]),
    ({"promotion": {"demote_rps": 3, "promote_rps": 1}}, ["promotion.demote_rps (3.0)", "below"]),
    ({"promotion": {"enabled": True}}, ["promotion.enabled", "promotion.slots >= 1", "got 0"]),
    ({"promotion": ON, "dynamic": {"enabled": False}}, ["promotion.enabled", "dynamic.enabled"]),
    ({"promotion": {"deny": ["Calendar"]}}, ["promotion.deny.0", "Calendar"]),
    ({"promotion": {"deny": ["a", "a"]}}, ["promotion.deny", "duplicate", "'a'"]),
    ({"promotion": {"slots": -1}}, ["promotion.slots", "-1"]),
    ({"promotion": {"promote_rps": 0}}, ["promotion.promote_rps", "0"]),
    ({"promotion": {"promote_window_s": 0}}, ["promotion.promote_window_s"]),
    ({"promotion": {"demote_rps": -1}}, ["promotion.demote_rps", "-1"]),
    ({"promotion": {"demote_window_s": 0}}, ["promotion.demote_window_s"]),
    ({"promotion": {"cooldown_s": -1}}, ["promotion.cooldown_s"]),
    ({"promotion": {"interval_s": 0}}, ["promotion.interval_s"]),
    ({"promotion": {"report_interval_s": 0}}, ["promotion.report_interval_s"]),
    ({"promotion": {"drain_s": -1}}, ["promotion.drain_s"]),
    ({"promotion": {"min_replicas": 2, "max_replicas": 1}}, ["min_replicas (2)"]),
    ({"promotion": {"slotz": 1}}, ["promotion.slotz", "Extra inputs"]),
]


@pytest.mark.parametrize(("data", "words"), BAD, ids=[w[0] for _, w in BAD])
def test_bad_promotion_names_field_and_value(data: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        DeploymentConfig.from_dict(data)
    for w in words:
        assert w in str(e.value)


def _cfg() -> DeploymentConfig:
    return DeploymentConfig.from_dict(
        {
            "dynamic": {"adapters": ["calendar", "mail"]},
            "promotion": {**ON, "promote_rps": 4.0, "demote_rps": 1.0, "cooldown_s": 60, "deny": ["mail"]},
        }
    )


def test_live_fields_leave_the_args_and_come_back_as_user_config() -> None:
    cfg = _cfg()
    promo_live = {k for s, k in LIVE_FIELDS if s == "promotion"}
    assert promo_live == set(PromotionLive.model_fields)
    args = cfg.static_dump()
    assert not promo_live & set(args["promotion"])  # type: ignore[arg-type]
    assert args["promotion"]["slots"] == 2  # type: ignore[index]
    static, live = DeploymentConfig.from_static(args)
    assert live is None and static.promotion.slots == 2 and static.promotion.enabled is False  # a placeholder
    user_config = LiveSettings.of(cfg).promotion.model_dump(mode="json")
    assert PromotionLive.from_user_config(user_config, "Promotion") == PromotionLive.of(cfg)
    assert user_config["deny"] == ["mail"] and user_config["cooldown_s"] == 60


def test_whole_config_carries_live_fields_and_a_missing_section_defaults() -> None:
    cfg = _cfg()
    whole, live = DeploymentConfig.from_static(cfg.model_dump(mode="json"))
    assert whole == cfg and live == LiveSettings.of(cfg)
    older = DeploymentConfig().model_dump(mode="json")
    del older["promotion"]  # a config written before the section existed
    _, live = DeploymentConfig.from_static(older)
    assert live is not None and live.promotion == PromotionLive.default()


def test_partial_promotion_live_fields_are_refused() -> None:
    data = _cfg().static_dump()
    data["promotion"]["enabled"] = True  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"some live fields but not .*promotion.promote_rps"):
        DeploymentConfig.from_static(data)


def test_live_settings_without_promotion_mean_off() -> None:
    cfg = DeploymentConfig()
    assert LiveSettings(gateway=GatewayLive.of(cfg), dynamic=DynamicLive.of(cfg)) == LiveSettings.of(cfg)


LIVE_BAD: list[tuple[dict[str, Any], str]] = [
    ({"demote_rps": 5.0}, "Promotion user_config: demote_rps (5.0) must be below promote_rps (2.0)"),
    ({"promote_rps": 0}, "Promotion user_config: promote_rps"),
    ({"deny": "calendar"}, "Promotion user_config: deny"),
    ({"deny": ["../x"]}, "Promotion user_config: deny.0"),
    ({"cooldown_s": -5}, "Promotion user_config: cooldown_s"),
    ({"slots": 3}, "Promotion user_config: slots: Extra inputs"),  # static: not a live field
]


@pytest.mark.parametrize(("edit", "words"), LIVE_BAD, ids=[w for _, w in LIVE_BAD])
def test_bad_promotion_user_config_is_refused(edit: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        PromotionLive.from_user_config(PromotionLive.default().model_dump() | edit, "Promotion")
    assert words in str(e.value)


def test_promotion_user_config_missing_a_field_is_refused() -> None:
    data = PromotionLive.default().model_dump()
    del data["cooldown_s"]
    with pytest.raises(ConfigError, match="Promotion user_config: cooldown_s: Field required"):
        PromotionLive.from_user_config(data, "Promotion")
