from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_core.config import DeploymentConfig
from moe_core.registry import AdapterRejected, deploy_adapter, list_adapters, main
from moe_core.storage.store import Storage


def _storage(cfg: DeploymentConfig) -> Storage:
    return Storage(cfg.storage.url)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file(fn(tensors), str(path))


def test_deploy_list_and_noop(cfg: DeploymentConfig, loras: dict[str, Path]) -> None:
    st = _storage(cfg)
    res = deploy_adapter(st, cfg, "alpha", loras["alpha"], eval_accuracy=0.9, dataset_name="synthetic")
    assert res.changed
    meta = st.read_json("expert", "alpha", "deploy_metadata.json")
    assert meta["base_model"] == "builtin:tiny-qwen3-vl" and meta["rank"] == 4
    assert meta["eval_accuracy"] == 0.9 and meta["dataset_name"] == "synthetic"
    assert len(meta["adapter_sha256"]) == 64 and set(meta["files_sha256"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    again = deploy_adapter(st, cfg, "alpha", loras["alpha"])
    assert not again.changed and again.version == res.version
    deploy_adapter(st, cfg, "router", loras["gamma"], role="router")
    rows = {(r["name"], r["kind"]) for r in list_adapters(st)}
    assert rows == {("alpha", "expert"), ("router", "router")}


def _bad_name(tmp: Path, src: Path) -> tuple[str, Path]:
    return "../escape", src


def _pickle(tmp: Path, src: Path) -> tuple[str, Path]:
    d = _copy(src, tmp / "p")
    torch.save({"x": torch.zeros(1)}, d / "adapter_model.bin")
    return "ok-name", d


def _other_base(tmp: Path, src: Path) -> tuple[str, Path]:
    d = _copy(src, tmp / "b")
    c = json.loads((d / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"
    (d / "adapter_config.json").write_text(json.dumps(c))
    return "ok-name", d


def _nan(tmp: Path, src: Path) -> tuple[str, Path]:
    d = _copy(src, tmp / "n")

    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = next(k for k in t if "lora_B" in k)
        t[k][0, 0] = float("nan")
        return t

    _edit_tensors(d, poison)
    return "ok-name", d


def _inf(tmp: Path, src: Path) -> tuple[str, Path]:
    d = _copy(src, tmp / "i")

    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = next(k for k in t if "lora_A" in k)
        t[k][0, 0] = float("inf")
        return t

    _edit_tensors(d, poison)
    return "ok-name", d


def _unmapped(tmp: Path, src: Path) -> tuple[str, Path]:
    """A tensor for a module the base model lacks (the vLLM Qwen-VL wrapper trap)."""
    d = _copy(src, tmp / "u")

    def rename(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = next(k for k in t if "q_proj.lora_A" in k)
        t[k.replace("model.language_model.", "model.")] = t.pop(k)
        return t

    _edit_tensors(d, rename)
    return "ok-name", d


def _wrong_shape(tmp: Path, src: Path) -> tuple[str, Path]:
    d = _copy(src, tmp / "s")

    def widen(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = next(k for k in t if "q_proj.lora_A" in k)
        t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 1)
        return t

    _edit_tensors(d, widen)
    return "ok-name", d


def _config_edit(key: str, value: object, tag: str):  # type: ignore[no-untyped-def]
    def make(tmp: Path, src: Path) -> tuple[str, Path]:
        d = _copy(src, tmp / tag)
        c = json.loads((d / "adapter_config.json").read_text())
        c[key] = value
        (d / "adapter_config.json").write_text(json.dumps(c))
        return "ok-name", d

    make.__name__ = f"_{tag}"
    return make


REFUSALS = [
    (_bad_name, "invalid adapter name"),
    (_pickle, "pickle weights"),
    (_other_base, "Qwen2-VL-2B-Instruct"),
    (_nan, "NaN or Inf"),
    (_inf, "NaN or Inf"),
    (_unmapped, "does not have"),
    (_wrong_shape, "does not fit"),
    (
        _config_edit("r", 999, "rank_over_limit"),
        "rank 999 is over the served maximum dynamic.max_lora_rank 32",
    ),
    (_config_edit("use_dora", True, "dora"), "DoRA"),
]


@pytest.mark.parametrize(("make", "message"), REFUSALS, ids=[m.__name__.strip("_") for m, _ in REFUSALS])
def test_refusals_write_nothing(
    cfg: DeploymentConfig, loras: dict[str, Path], tmp_path: Path, make, message
) -> None:  # type: ignore[no-untyped-def]
    name, folder = make(tmp_path, loras["alpha"])
    st = _storage(cfg)
    with pytest.raises(AdapterRejected, match=message):
        deploy_adapter(st, cfg, name, folder)
    storage_root = Path(cfg.storage.url)
    assert not storage_root.exists() or not any(p.is_file() for p in storage_root.rglob("*"))


def test_cli_deploy_list_rollback(
    cfg: DeploymentConfig, loras: dict[str, Path], tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "d.yaml"
    conf.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["--config", str(conf), "deploy", "beta", str(loras["beta"]), "--eval-accuracy", "0.5"]) == 0
    assert main(["--config", str(conf), "deploy", "beta", str(loras["gamma"])]) == 0
    assert main(["--config", str(conf), "list"]) == 0
    out = capsys.readouterr().out
    assert "beta" in out and "deployed" in out
    assert main(["--config", str(conf), "rollback", "beta"]) == 0
    meta = Storage(cfg.storage.url).read_json("expert", "beta", "deploy_metadata.json")
    assert meta["eval_accuracy"] == 0.5
    assert main(["--config", str(conf), "deploy", "Bad/Name", str(loras["beta"])]) == 2
    assert "invalid adapter name" in capsys.readouterr().err


def test_module_entry_points_run_without_runpy_warnings(tmp_path: Path) -> None:
    """`python -m moe_core.registry` (and the probes CLI) run their module once: no package import first."""
    import subprocess
    import sys

    conf = tmp_path / "d.yaml"
    conf.write_text(f"storage:\n  url: {tmp_path / 'st'}\n")
    for module in ("moe_core.registry", "moe_core.probes"):
        out = subprocess.run(
            [sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--config", str(conf), "list"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and "RuntimeWarning" not in out.stderr, (module, out.stderr[-500:])
