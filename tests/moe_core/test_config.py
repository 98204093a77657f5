from __future__ import annotations

from pathlib import Path

import pytest

from moe_core.config import ConfigError, DeploymentConfig

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads() -> None:
    cfg = DeploymentConfig.from_file(ROOT / "config" / "deployment.yaml")
    assert cfg.router.labels and set(cfg.router.labels.values()) <= set(cfg.all_adapters)
    assert cfg.base_model.trust_remote_code is False
    assert [m.name for m in cfg.models_enabled] == ["chandra"]
    # every demo expert declares its answer's grammar, and so does the further model chandra
    assert set(cfg.outputs) == set(cfg.all_adapters) | {m.name for m in cfg.models}
    # chandra: a further full model, its own limits over the top-level ones
    assert cfg.model_limits("chandra").max_completion_tokens == 12384
    assert cfg.model_limits("chandra").max_image_bytes == cfg.limits.max_image_bytes
    assert cfg.outputs["calendar"].constraint("calendar").value == r"click\([0-3], [0-3]\)"


BAD = [
    # (data, words the message must contain)
    ({"merged": {"adapters": [{"name": "a"}]}, "dynamic": {"adapters": ["a"]}}, ["both", "'a'"]),
    ({"merged": {"adapters": [{"name": "a"}, {"name": "a"}]}}, ["merged.adapters", "duplicate", "'a'"]),
    ({"dynamic": {"adapters": ["b", "b"]}}, ["dynamic.adapters", "duplicate", "'b'"]),
    ({"dynamic": {"adapters": ["b"]}, "router": {"labels": {0: "zz"}}}, ["router.labels", "zz"]),
    ({"dynamic": {"adapters": ["b"]}, "router": {"labels": {0: "b", 1: "b"}}}, ["router.labels", "'b'"]),
    ({"dynamic": {"adapters": ["router"]}}, ["router.adapter", "'router'"]),
    ({"merged": {"adapters": [{"name": "../etc"}]}}, ["merged.adapters.0.name", "../etc"]),
    ({"dynamic": {"adapters": ["Calendar"]}}, ["dynamic.adapters.0", "Calendar"]),
    ({"merged": {"adaptrs": []}}, ["merged.adaptrs", "Extra inputs"]),
    ({"gateway": {"prefer_merged": "maybe"}}, ["gateway.prefer_merged", "maybe"]),
    ({"router": {"confidence_threshold": 1.5}}, ["router.confidence_threshold", "1.5"]),
    ({"base_model": {"dtype": "float64"}}, ["base_model.dtype", "float64"]),
    ({"merged": {"adapters": [{"name": "a", "min_replicas": 3, "max_replicas": 1}]}}, ["min_replicas (3)"]),
    ({"limits": {"max_new_tokens": 0}}, ["limits.max_new_tokens", "0"]),
    ({"dynamic": {"adapters": ["b"]}, "outputs": {"zz": {"regex": "a"}}}, ["outputs", "zz"]),
    ({"dynamic": {"adapters": ["b"]}, "outputs": {"b": {"regex": "a("}}}, ["outputs.b", "does not compile"]),
    ({"dynamic": {"adapters": ["b"]}, "outputs": {"b": {}}}, ["outputs.b", "exactly one"]),
    (
        {"dynamic": {"adapters": ["b"]}, "outputs": {"b": {"json_schema": {"type": "objectx"}}}},
        ["outputs.b", "json_schema does not compile"],
    ),
]


@pytest.mark.parametrize(("data", "words"), BAD, ids=[w[0] for _, w in BAD])
def test_bad_config_names_field_and_value(data: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        DeploymentConfig.from_dict(data)
    for w in words:
        assert w in str(e.value)


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "d.yaml"
    p.write_text("merged: [unclosed\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: not valid YAML"):
        DeploymentConfig.from_file(p)
    p.write_text("limits:\n  max_batch_size: -1\n")
    with pytest.raises(ConfigError, match=r"d.yaml: limits.max_batch_size.*-1"):
        DeploymentConfig.from_file(p)


def test_every_field_has_a_description() -> None:
    from pydantic import BaseModel

    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            ann = f.annotation
            for t in (ann, *getattr(ann, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t)

    walk(DeploymentConfig)
    assert len(seen) >= 8
