"""The generated Serve config: args without live fields, user_configs from the live models, and the
validator for hand-edited copies."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from deployments.app import DYNAMIC_NAME, GATEWAY_NAME, AppArgs
from deployments.serve_config import render, validate
from moe_core.config import LIVE_FIELDS, ConfigError, DeploymentConfig, LiveSettings

ROOT = Path(__file__).resolve().parents[2]
CFG = DeploymentConfig.from_file(ROOT / "config" / "deployment.yaml")


def _doc() -> dict:  # type: ignore[type-arg]
    return dict(yaml.safe_load(render(CFG)))


def _deployment(doc: dict, name: str) -> dict:  # type: ignore[type-arg]
    return next(d for d in doc["applications"][0]["deployments"] if d["name"] == name)


def test_generated_config_is_valid_and_splits_live_fields() -> None:
    doc = _doc()
    assert validate(doc) == []
    args = doc["applications"][0]["args"]["config"]
    assert all(key not in args[section] for section, key in LIVE_FIELDS)
    static, live = DeploymentConfig.from_static(args)
    assert live is None and static.base_model == CFG.base_model
    assert _deployment(doc, DYNAMIC_NAME)["user_config"] == LiveSettings.of(CFG).dynamic.model_dump(
        mode="json"
    )


@pytest.mark.parametrize(
    ("deployment", "edit", "words"),
    [
        (DYNAMIC_NAME, {"max_loaded_adapters": 0}, "DynamicLoRA user_config: max_loaded_adapters"),
        (DYNAMIC_NAME, {"adapters": "calendar"}, "DynamicLoRA user_config: adapters"),
        (GATEWAY_NAME, {"confidence_threshold": "high"}, "Gateway user_config: confidence_threshold"),
        (GATEWAY_NAME, {"dynamic_adapters": ["desktop"]}, "differ from DynamicLoRA adapters"),
    ],
)
def test_hand_edited_user_config_is_refused_naming_the_field(deployment: str, edit: dict, words: str) -> None:  # type: ignore[type-arg]
    doc = copy.deepcopy(_doc())
    _deployment(doc, deployment)["user_config"].update(edit)
    problems = validate(doc)
    assert len(problems) == 1 and words in problems[0], problems


def test_partial_live_fields_in_args_are_refused() -> None:
    data = CFG.static_dump()
    data["gateway"]["prefer_merged"] = True  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"some live fields but not .*dynamic.adapters"):
        DeploymentConfig.from_static(data)


def test_app_args_take_a_config_file_with_its_live_fields() -> None:
    cfg, live = AppArgs(config=str(ROOT / "config" / "deployment.yaml")).deployment_config()
    assert cfg == CFG and live == LiveSettings.of(CFG)
    cfg2, live2 = AppArgs(config=CFG.model_dump(mode="json")).deployment_config()
    assert cfg2 == CFG and live2 == live
