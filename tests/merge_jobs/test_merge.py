from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_jobs.merge import MERGE_METADATA, MergeRefused, merge_adapter
from moe_core.engine import Engine, GenerationRequest
from moe_core.probes import load_probes, publish_probes
from moe_core.registry import deploy_adapter
from moe_core.storage.errors import StorageError
from moe_core.storage.store import Storage
from tests.helpers import PROBES


def _greedy(engine: Engine, adapter: str | None, probes: list) -> list[str]:  # type: ignore[type-arg]
    return [r.text for r in engine.generate([GenerationRequest(im, p, adapter) for im, p in probes])]


def test_merge_publishes_a_plain_model_equal_to_base_plus_lora(merge_cfg, loras) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = merge_cfg
    res = merge_adapter(cfg, "alpha")
    assert res.changed and res.greedy_agreement == 1.0 and res.max_logit_diff is not None
    assert res.max_logit_diff < 1e-4  # fp32
    st = Storage(cfg.storage.url)
    path, version = st.fetch("merged", "alpha")
    assert version == res.version
    meta = st.read_json("merged", "alpha", MERGE_METADATA)
    for key in (
        "adapter_name",
        "source_lora",
        "base_model",
        "merged_at",
        "safe_merge",
        "total_params",
        "source_eval_accuracy",
        "source_dataset",
        "source_adapter_sha256",
        "dtype",
        "max_logit_diff",
        "probe_set",
    ):
        assert key in meta, key
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(path)
    assert type(model) is Qwen3VLForConditionalGeneration
    assert meta["probe_set"] == "default" and meta["num_probes"] == 4
    merged = Engine.load(cfg.engine_settings, path)
    dynamic = Engine.load(cfg.engine_settings)
    dynamic.load_adapter("alpha", loras["alpha"])
    probes = PROBES
    assert _greedy(merged, None, probes) == _greedy(dynamic, "alpha", probes)
    assert _greedy(dynamic, None, probes) != _greedy(dynamic, "alpha", probes)  # the LoRA matters
    # unchanged adapter: nothing to do
    again = merge_adapter(cfg, "alpha")
    assert not again.changed and again.version == res.version


def _overflowing(src: Path, dst: Path) -> Path:
    """Finite LoRA weights whose product overflows fp32: passes the registry, must fail the merge."""
    shutil.copytree(src, dst)
    t = load_file(str(dst / "adapter_model.safetensors"))
    for k in t:
        if "layers.1.mlp.down_proj" in k:
            t[k] = torch.full_like(t[k], 1e30)
    save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_unsafe_merge_refused_and_previous_version_stays(merge_cfg, loras, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = merge_cfg
    good = merge_adapter(cfg, "alpha").version
    bad = _overflowing(loras["alpha"], tmp_path / "bad")
    deploy_adapter(Storage(cfg.storage.url), cfg, "alpha", bad)
    with pytest.raises(MergeRefused, match=r"'alpha'.*layers\.1\.mlp\.down_proj"):
        merge_adapter(cfg, "alpha")
    st = Storage(cfg.storage.url)
    assert st.current_version("merged", "alpha") == good
    assert st.versions("merged", "alpha") == [good]


def test_rollback(merge_cfg, loras) -> None:  # type: ignore[no-untyped-def]
    cfg, path = merge_cfg
    v1 = merge_adapter(cfg, "alpha").version
    deploy_adapter(Storage(cfg.storage.url), cfg, "alpha", loras["beta"])
    v2 = merge_adapter(cfg, "alpha").version
    assert v2 > v1
    out = subprocess.run(
        [sys.executable, "-m", "merge_jobs", "--config", str(path), "--rollback", "alpha"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert v1 in out.stdout
    assert Storage(cfg.storage.url).current_version("merged", "alpha") == v1


@pytest.mark.parametrize("kill_at", ["load adapter", "merge", "verify", "save", "publish"])
def test_sigkilled_merge_leaves_storage_as_it_was(merge_cfg, loras, kill_at: str) -> None:  # type: ignore[no-untyped-def]
    cfg, path = merge_cfg
    good = merge_adapter(cfg, "alpha").version
    deploy_adapter(Storage(cfg.storage.url), cfg, "alpha", loras["beta"])  # something new to merge
    proc = subprocess.Popen(
        [sys.executable, "-m", "merge_jobs", "--no-ray", "--config", str(path), "--adapter-name", "alpha"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"merge alpha: {kill_at} ..." in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"never reached stage {kill_at!r}"
    st = Storage(cfg.storage.url)
    assert st.current_version("merged", "alpha") == good
    assert st.versions("merged", "alpha") == [good]
    assert Engine.load(cfg.engine_settings, st.fetch("merged", "alpha")[0]).generate(
        [GenerationRequest(*PROBES[0])]
    )


def test_bad_name_and_missing_adapter(merge_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = merge_cfg
    with pytest.raises(ValueError, match="invalid adapter name"):
        merge_adapter(cfg, "../alpha")
    with pytest.raises(StorageError, match="no published expert named 'gamma'"):
        merge_adapter(cfg, "gamma")


def test_merge_without_probe_set_is_refused(merge_cfg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = merge_cfg
    data = cfg.model_dump(mode="json")
    data["merge"]["probe_set"] = "screens-v2"  # published nowhere, and alpha has no set of its own
    other = type(cfg).from_dict(data)
    with pytest.raises(MergeRefused, match=r"'alpha'.*no probe set.*probes/alpha/.*probes/screens-v2/"):
        merge_adapter(other, "alpha")
    assert Storage(cfg.storage.url).current_version("merged", "alpha") is None


def test_adapter_probe_set_preferred_over_default(merge_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = merge_cfg
    st = Storage(cfg.storage.url)
    assert load_probes(st, "alpha", "default", 3)[0] == "default"
    publish_probes(st, "alpha", PROBES[4:])
    name, probes = load_probes(st, "alpha", "default", 3)
    assert name == "alpha" and [p for _, p in probes] == ["Click the button 4", "Click the button 5"]
    assert merge_adapter(cfg, "alpha").changed
    assert st.read_json("merged", "alpha", MERGE_METADATA)["probe_set"] == "alpha"
