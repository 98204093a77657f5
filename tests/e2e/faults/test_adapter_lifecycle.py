"""Adapter lifecycle defects (hardening items 4, 5, 6 and 10): a refused reload never leaves a
half-loaded adapter; the registry refuses what the dynamic deployment's slots cannot serve; a
``CURRENT`` pointer is read, not trusted; a live reconfigure is validated before it is applied."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_core.config import ConfigError, DeploymentConfig
from moe_core.engine import Engine, EngineError, GenerationRequest
from moe_core.registry import AdapterRejected, deploy_adapter
from moe_core.storage.errors import StorageError
from moe_core.storage.store import Storage
from tests.helpers import make_lora, screenshot

Edit = Callable[[dict[str, torch.Tensor], dict[str, object]], None]


def _edited(src: Path, dst: Path, edit: Edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    config = json.loads((dst / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _first(tensors: dict[str, torch.Tensor], part: str) -> str:
    return sorted(k for k in tensors if f".{part}." in k)[0]


def test_4_a_refused_reload_leaves_the_loaded_adapter_whole(tmp_path: Path) -> None:
    """A new version whose lora_B has another rank than its ``r`` is refused before the slot is touched:
    the old version keeps answering exactly (it used to be half-loaded, serving wrong answers)."""
    good = make_lora(tmp_path / "beta", seed=12, rank=8)
    e = Engine.load(DeploymentConfig().engine_settings, name="reload")
    e.set_lora_slots(2, 8)
    e.load_adapter("beta", good)
    req = [GenerationRequest(screenshot(2), "Click", "beta", max_new_tokens=8)]
    before = e.logits(req)

    def narrow(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
        last = sorted(k for k in t if "lora_B" in k)[-1]  # the last module: earlier ones would fit
        t[last] = t[last][:, :4].contiguous()

    bad = _edited(good, tmp_path / "bad", narrow)
    with pytest.raises(EngineError, match="does not fit rank 8"):
        e.load_adapter("beta", bad)
    assert torch.equal(e.logits(req), before)


def _b_rank(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
    k = _first(t, "lora_B")
    t[k] = t[k][:, :2].contiguous()


def _both_ranks(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
    c["r"] = 8  # A and B agree with each other (rank 4), not with the config


def _rank_pattern(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
    c["rank_pattern"] = {"q_proj": 2}


def _dora(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
    c["use_dora"] = True


def _magnitude(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
    k = _first(t, "lora_B").replace(".lora_B.weight", ".lora_magnitude_vector")
    t[k] = torch.ones(t[_first(t, "lora_B")].shape[0])


def _lone_a(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
    del t[_first(t, "lora_B")]


def _conv(t: dict[str, torch.Tensor], c: dict[str, object]) -> None:
    """A LoRA on the vision tower's 3-D patch convolution (its weight is 5-D, not a linear layer)."""
    prefix = "base_model.model.model.visual.patch_embed.proj"
    t[f"{prefix}.lora_A.weight"] = torch.zeros(4, 3 * 2 * 16 * 16)
    t[f"{prefix}.lora_B.weight"] = torch.zeros(64, 4)


SERVABLE_REFUSALS: list[tuple[Edit, str]] = [
    (_b_rank, "do not fit the config's rank r = 4"),
    (_both_ranks, "do not fit the config's rank r = 8"),
    (_lone_a, "only one of lora_A and lora_B"),
    (_rank_pattern, "rank_pattern"),
    (_dora, "DoRA"),
    (_magnitude, "not a LoRA A/B weight"),
    (_conv, "only linear layers are served"),
]


@pytest.mark.parametrize(
    ("edit", "message"), SERVABLE_REFUSALS, ids=[e.__name__.strip("_") for e, _ in SERVABLE_REFUSALS]
)
def test_5_the_registry_refuses_what_the_slots_cannot_serve(
    cfg: DeploymentConfig, loras: dict[str, Path], tmp_path: Path, edit: Edit, message: str
) -> None:
    """Adapters like these used to deploy, work alone under PEFT and fail every mixed batch they joined."""
    folder = _edited(loras["alpha"], tmp_path / "edited", edit)
    with pytest.raises(AdapterRejected, match=message):
        deploy_adapter(Storage(cfg.storage.url), cfg, "alpha", folder)
    assert not Path(cfg.storage.url).exists() or not any(Path(cfg.storage.url).rglob("*.safetensors"))


def test_5_what_deploys_loads_into_the_slots(cfg: DeploymentConfig, loras: dict[str, Path]) -> None:
    st = Storage(cfg.storage.url)
    e = Engine.load(cfg.engine_settings, name="servable")
    e.set_lora_slots(3, cfg.dynamic.max_lora_rank)
    for name in ("alpha", "gamma"):  # gamma adapts the LM head as well
        deploy_adapter(st, cfg, name, loras[name])
        e.load_adapter(name, st.fetch("expert", name)[0])
    texts = [
        r.text for r in e.generate([GenerationRequest(screenshot(3), "Click", a) for a in ("alpha", "gamma")])
    ]
    assert len(texts) == 2


@pytest.mark.parametrize(
    ("pointer", "words"),
    [
        (b"{not json", "pointer is not JSON"),
        (b"\xff\xfe", "pointer is not JSON"),
        (b'["v1"]', "no valid version"),
        (b'{"version": "../../../../etc"}', "no valid version"),
        (b'{"version": 7}', "no valid version"),
    ],
)
def test_6_a_broken_current_pointer_is_a_storage_error_naming_it(
    tmp_path: Path, pointer: bytes, words: str
) -> None:
    """CURRENT is read, not trusted: its version is joined into paths by every reader."""
    st = Storage(str(tmp_path / "s"))
    src = tmp_path / "a"
    src.mkdir()
    (src / "f.txt").write_text("x")
    st.publish("expert", "alpha", src)
    (Path(st.versions_dir("expert", "alpha")) / "CURRENT").write_bytes(pointer)
    with pytest.raises(StorageError, match=words) as e:
        st.current_version("expert", "alpha")
    assert "CURRENT" in str(e.value)


def test_10_a_live_reconfigure_of_the_dynamic_deployment_is_validated(tmp_path: Path) -> None:
    """``adapters: calendar`` used to become a set of letters and ``max_loaded_adapters: 0`` broke every
    batch; now each is refused naming its field, and a refused reconfigure changes nothing."""
    from tests.deployments.models.test_deployments_unit import LIVE, _dynamic, _publish

    st = Storage(str(tmp_path / "storage"))
    _publish(st, tmp_path, "expert", "login-window", "v1")
    d, engine = _dynamic(st)
    for bad, field in (
        ({"adapters": "calendar", "max_loaded_adapters": 2}, "adapters"),
        ({"adapters": ["login-window"], "max_loaded_adapters": 0}, "max_loaded_adapters"),
        ({"adapters": ["../x"], "max_loaded_adapters": 2}, "adapters.0"),
    ):
        with pytest.raises(ConfigError, match=rf"DynamicLoRA user_config: {field}"):
            d.reconfigure(bad)
    assert (
        d.live == LIVE.dynamic
        and d.cache is not None
        and d.cache.capacity == LIVE.dynamic.max_loaded_adapters
    )
    assert engine.slots[0] == LIVE.dynamic.max_loaded_adapters + 1  # the LRU's slots and the router's
