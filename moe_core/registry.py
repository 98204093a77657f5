"""The adapter registry: validate a PEFT LoRA folder and deploy it into shared storage.

An adapter is refused, with nothing written, when its name is unsafe, it ships pickle weights, it was
trained on another base model, a weight is NaN/Inf, or any LoRA tensor does not land on a module of the
base model with matching shapes (an adapter is never half-applied).

Command line::

    python -m moe_core.registry deploy calendar path/to/lora [--eval-accuracy 0.97 --dataset-name X]
    python -m moe_core.registry deploy router path/to/lora --router
    python -m moe_core.registry list
    python -m moe_core.registry rollback calendar
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from moe_core.config import DeploymentConfig, validate_adapter_name
from moe_core.modeling import base_model_id, module_shapes, resolve_model_path
from moe_core.storage.layout import Kind, Progress, VersionInfo, sha256_file
from moe_core.storage.store import Storage

__all__ = [
    "AdapterRejected",
    "DeployResult",
    "Role",
    "ValidatedAdapter",
    "adapter_digest",
    "deploy_adapter",
    "list_adapters",
    "main",
    "validate_adapter",
]

logger = logging.getLogger(__name__)

METADATA = "deploy_metadata.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_LORA_EXTRA = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)


#: An adapter's role, which is also its storage kind: an expert, or the routing adapter.
Role = Literal["expert", "router"]


class AdapterRejected(ValueError):
    """An adapter that must not be served; the message names the adapter and the reason."""


@dataclass(frozen=True)
class ValidatedAdapter:
    """What the checks found: the adapter's PEFT config and how many tensors it holds."""

    config: dict[str, Any]
    num_tensors: int


@dataclass(frozen=True)
class DeployResult(VersionInfo):
    """The version a deploy made (or found) current; ``changed`` is False when it was already there."""

    changed: bool = True


def adapter_digest(folder: Path) -> str:
    """One sha256 over the adapter's weight and config files (what decides its behaviour)."""
    h = hashlib.sha256()
    for f in ADAPTER_FILES:
        h.update(f.encode())
        h.update(sha256_file(folder / f).encode())
    return h.hexdigest()


def _check_files(name: str, src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise AdapterRejected(f"adapter {name!r}: {src} is not a folder")
    pickles = sorted(p.name for p in src.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterRejected(
            f"adapter {name!r}: pickle weights {pickles} refused; save with safetensors "
            "(PeftModel.save_pretrained(..., safe_serialization=True))"
        )
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise AdapterRejected(f"adapter {name!r}: missing {missing} in {src}")
    try:
        config = json.loads((src / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise AdapterRejected(f"adapter {name!r}: adapter_config.json is not JSON: {e}") from e
    if config.get("peft_type") != "LORA":
        raise AdapterRejected(f"adapter {name!r}: expected peft_type 'LORA', got {config.get('peft_type')!r}")
    return dict(config)


def _check_base(name: str, config: dict[str, Any], cfg: DeploymentConfig) -> None:
    got = config.get("base_model_name_or_path")
    accepted = {base_model_id(cfg.base_model), os.path.realpath(resolve_model_path(cfg.base_model))}
    if got not in accepted and (got is None or os.path.realpath(got) not in accepted):
        raise AdapterRejected(
            f"adapter {name!r}: trained on base model {got!r}, expected {base_model_id(cfg.base_model)!r}"
        )


def _check_tensors(name: str, src: Path, cfg: DeploymentConfig, config: dict[str, Any]) -> int:
    """NaN/Inf and placement checks; returns the number of tensors."""
    import torch
    from safetensors import safe_open

    modules = module_shapes(cfg.base_model)
    params = {f"{m}.weight": shape for m, (_, shape) in modules.items() if shape}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    n = 0
    with safe_open(str(src / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(key)
            n += 1
            if not torch.isfinite(t.float()).all():
                raise AdapterRejected(f"adapter {name!r}: tensor {key} holds NaN or Inf values")
            _check_placement(name, key, tuple(t.shape), modules, params)
            _check_slottable(name, key, tuple(t.shape), modules, pairs)
    if n == 0:
        raise AdapterRejected(f"adapter {name!r}: adapter_model.safetensors holds no tensors")
    _check_ranks(name, config, pairs)
    return n


def _check_slottable(
    name: str,
    key: str,
    shape: tuple[int, ...],
    modules: dict[str, tuple[str, tuple[int, ...]]],
    pairs: dict[str, dict[str, tuple[int, ...]]],
) -> None:
    """What the dynamic deployment's LoRA slots hold: LoRA A/B pairs on linear layers, nothing else
    (no embedding LoRA, no full replacement weights, no DoRA magnitudes), so an adapter that deploys is
    one that every mixed batch can serve."""
    rel = key[len(_PREFIX) :]
    m = _LORA_KEY.match(rel)
    if m is None:
        raise AdapterRejected(
            f"adapter {name!r}: tensor {key} is not a LoRA A/B weight (embedding LoRA, modules_to_save and "
            "DoRA cannot share a mixed batch); not served"
        )
    kind, wshape = modules[m["module"]]
    if kind != "Linear" or len(wshape) != 2:
        raise AdapterRejected(
            f"adapter {name!r}: tensor {key} adapts {kind} {m['module']} (weight shape {wshape}); only "
            "linear layers are served"
        )
    pairs.setdefault(m["module"], {})[m["part"]] = shape


def _check_ranks(name: str, config: dict[str, Any], pairs: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Every module's lora_A and lora_B both present and of the config's rank ``r`` (the slots scale
    and place each pair by ``r``; a per-module ``rank_pattern`` or ``alpha_pattern`` is not served)."""
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise AdapterRejected(
                f"adapter {name!r}: adapter_config.json sets {field}; per-module ranks are not served"
            )
    rank = config["r"]
    for module, parts in sorted(pairs.items()):
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            raise AdapterRejected(f"adapter {name!r}: module {module} has only one of lora_A and lora_B")
        if a[0] != rank or b[1] != rank:
            raise AdapterRejected(
                f"adapter {name!r}: module {module} has lora_A {a} and lora_B {b}, which do not fit the "
                f"config's rank r = {rank}"
            )


def _check_placement(
    name: str,
    key: str,
    shape: tuple[int, ...],
    modules: dict[str, tuple[str, tuple[int, ...]]],
    params: dict[str, tuple[int, ...]],
) -> None:
    if not key.startswith(_PREFIX):
        raise AdapterRejected(f"adapter {name!r}: tensor {key} is not under {_PREFIX!r}; not a PEFT adapter")
    rel = key[len(_PREFIX) :].replace(".base_layer.", ".")  # saved embedding/lm_head copies
    m = _LORA_KEY.match(rel) or _LORA_EXTRA.match(rel)
    if m is None:  # modules_to_save: a full replacement weight
        if params.get(rel) != shape:
            raise AdapterRejected(
                f"adapter {name!r}: tensor {key} {shape} matches no parameter of the base model "
                f"(expected shape {params.get(rel)})"
            )
        return
    module, part = m["module"], m["part"]
    if module not in modules:
        raise AdapterRejected(
            f"adapter {name!r}: tensor {key} targets module {module!r}, which the base model does not have"
        )
    kind, wshape = modules[module]
    if part in ("lora_A", "lora_B") and len(wshape) == 2:
        out_f, in_f = wshape
        ok = shape[1] == in_f if part == "lora_A" else shape[0] == out_f
        if len(shape) != 2 or not ok:
            raise AdapterRejected(
                f"adapter {name!r}: tensor {key} has shape {shape}, which does not fit {kind} {module} "
                f"of weight shape {wshape}"
            )


def validate_adapter(cfg: DeploymentConfig, name: str, src: Path) -> ValidatedAdapter:
    """Every check :func:`deploy_adapter` makes. Raises :class:`AdapterRejected`."""
    try:
        validate_adapter_name(name)
    except ValueError as e:
        raise AdapterRejected(str(e)) from e
    config = _check_files(name, Path(src))
    _check_base(name, config, cfg)
    _check_servable(name, config, cfg)
    return ValidatedAdapter(config, _check_tensors(name, Path(src), cfg, config))


def _check_servable(name: str, config: dict[str, Any], cfg: DeploymentConfig) -> None:
    """What the dynamic deployment's LoRA slots can hold: rank up to dynamic.max_lora_rank, no DoRA."""
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterRejected(f"adapter {name!r}: adapter_config.json has no valid rank r ({rank!r})")
    if rank > cfg.dynamic.max_lora_rank:
        raise AdapterRejected(
            f"adapter {name!r}: rank {rank} is over the served maximum dynamic.max_lora_rank "
            f"{cfg.dynamic.max_lora_rank}; retrain at a lower rank or raise the limit"
        )
    if config.get("use_dora"):
        raise AdapterRejected(f"adapter {name!r}: DoRA adapters cannot share a mixed batch; not served")


def deploy_adapter(
    storage: Storage,
    cfg: DeploymentConfig,
    name: str,
    src: Path,
    *,
    role: Role = "expert",
    eval_accuracy: float | None = None,
    dataset_name: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> DeployResult:
    """Validate ``src`` and publish it as the current version of ``name``; a no-op when unchanged."""
    kind: Kind = role
    src = Path(src)
    checked = validate_adapter(cfg, name, src)
    config = checked.config
    digest = adapter_digest(src)
    current = storage.current_version(kind, name)
    if current is not None:
        meta = storage.read_json(kind, name, METADATA, current)
        if meta.get("adapter_sha256") == digest and meta.get("base_model") == base_model_id(cfg.base_model):
            logger.info("adapter %s: unchanged (sha256 %s), version %s stays", name, digest[:12], current)
            return DeployResult(kind, name, current, True, meta, changed=False)
    metadata = {
        "adapter_name": name,
        "role": role,
        "adapter_sha256": digest,
        "files_sha256": {f: sha256_file(src / f) for f in ADAPTER_FILES},
        "base_model": base_model_id(cfg.base_model),
        "rank": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "num_tensors": checked.num_tensors,
        "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "eval_accuracy": eval_accuracy,
        "dataset_name": dataset_name,
        **(extra_metadata or {}),
    }
    with tempfile.TemporaryDirectory(prefix="moe-deploy-") as tmp:
        stage = Path(tmp)
        for f in ADAPTER_FILES:
            shutil.copy2(src / f, stage / f)
        (stage / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        version = storage.publish(kind, name, stage, progress=progress)
    storage.prune(kind, name, cfg.storage.keep_versions)
    logger.info("adapter %s: deployed as %s version %s", name, kind, version)
    return DeployResult(kind, name, version, True, metadata)


def list_adapters(storage: Storage) -> list[dict[str, Any]]:
    rows = []
    kinds: tuple[Kind, ...] = ("router", "expert")
    for kind in kinds:
        for name in storage.names(kind):
            version = storage.current_version(kind, name)
            meta = storage.read_json(kind, name, METADATA, version)
            rows.append({"name": name, "kind": kind, "version": version, **meta})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_core.registry", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config/deployment.yaml", help="deployment config")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy", help="validate and deploy a PEFT LoRA folder")
    d.add_argument("name")
    d.add_argument("path", type=Path)
    d.add_argument("--router", action="store_true", help="deploy as the routing adapter")
    d.add_argument("--eval-accuracy", type=float)
    d.add_argument("--dataset-name")
    sub.add_parser("list", help="list deployed adapters")
    r = sub.add_parser("rollback", help="make the previous version current")
    r.add_argument("name")
    r.add_argument("--router", action="store_true", help="roll back the routing adapter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DeploymentConfig.from_file(args.config)
    storage = Storage.from_config(cfg.storage)
    try:
        if args.cmd == "deploy":
            res = deploy_adapter(
                storage,
                cfg,
                args.name,
                args.path,
                role="router" if args.router else "expert",
                eval_accuracy=args.eval_accuracy,
                dataset_name=args.dataset_name,
            )
            print(f"{res.name}: version {res.version} ({'deployed' if res.changed else 'unchanged'})")
        elif args.cmd == "list":
            print(f"{'name':<16} {'kind':<8} {'version':<32} {'rank':>4} {'accuracy':>8}")
            for row in list_adapters(storage):
                acc = row.get("eval_accuracy")
                acc_s = f"{acc:.3f}" if isinstance(acc, float) else "-"
                print(
                    f"{row['name']:<16} {row['kind']:<8} {row['version']:<32} {row['rank']!s:>4} {acc_s:>8}"
                )
        else:
            kind: Kind = "router" if args.router else "expert"
            print(f"{args.name}: current version is now {storage.rollback(kind, args.name)}")
    except (AdapterRejected, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
