"""Build the embedded default: base model, routing adapter and one expert per configured screen type.

Deterministic from a seed; each adapter carries a build key (hash of everything that decides its
bytes) in its deploy metadata, so a rebuild with nothing changed trains nothing and takes seconds.
Screen types the config does not name are neither trained nor deployed. Each adapter is trained
with up to ``ATTEMPTS`` seeds, stopping at the first that reaches its target on the validation
split; the accuracy reported and stored is measured on the held-out split, which selection never sees.
Reading experts (``ocr``) are scored by exact match (their accuracy) and character accuracy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moe_core.config import DeploymentConfig
from moe_core.engine import Engine
from moe_core.modeling import resolve_model_path
from moe_core.probes import publish_probes, write_probe_folder
from moe_core.registry import METADATA, Role, deploy_adapter
from moe_core.storage.layout import sha256_file
from moe_core.storage.store import Storage
from moe_demo import screens, train
from moe_demo.screens import READING_TYPES, SCREEN_TYPES, split
from moe_demo.train import (
    FeatureBank,
    TrainSpec,
    evaluate_expert,
    evaluate_reader,
    evaluate_router,
    train_adapter,
)

__all__ = ["BuildReport", "DemoPlan", "build_demo", "evaluate_demo", "plan"]

logger = logging.getLogger(__name__)

DATASET = "synthetic-screens-v1"
EVAL_FILE = "eval.json"
#: 600 steps, not 300: at 300 the router was right on 99.7% of held-out screens but its confidence was
#: low (median 0.56 over seven types, 16% of screens under the 0.5 threshold that serving rejects below);
#: at 600, median 0.90 and none under it on the validation split (10 s more).
ROUTER_SPEC = TrainSpec("router", steps=600, batch_size=8, lr=1e-3, rank=16, seed=11)
EXPERT_SPEC = TrainSpec("expert", steps=450, batch_size=32, lr=4e-3, rank=16, seed=7, warmup_clean=0.4)
TRAIN_PER_KIND = {"router": 100, "expert": 400}
#: Screen types trained otherwise than EXPERT_SPEC. The reading expert answers one of 34 characters at
#: each of up to 6 places (a click expert: one of 16 cells): it needs more steps and examples, a faster
#: LM head and attention supervision (moe_demo.train), and no uncluttered warm-up.
KIND_SPECS: dict[str, dict[str, Any]] = {
    "ocr": {"steps": 1000, "head_lr": 10.0, "attend": 1.0, "warmup_clean": 0.0},
}
#: Training screens per type where it differs from TRAIN_PER_KIND["expert"].
KIND_TRAIN = {"ocr": 3000}
#: Validation accuracy that ends the attempts: the issue's targets (routing 97%, experts 90%).
ACCEPT = {"router": 0.97, "expert": 0.90}
#: Training attempts per adapter, each from its own seed; the best on the validation split is kept.
#: LoRA on the tiny random model leaves a loss plateau (chance on the click cell) at a step that
#: depends on the seed, so a run that escapes late is retrained rather than shipped.
ATTEMPTS = 3
SEED_STRIDE = 1000


@dataclass(frozen=True)
class DemoPlan:
    router: str | None
    kinds: tuple[str, ...]  # screen types that are configured experts
    router_spec: TrainSpec
    expert_spec: TrainSpec
    expert_specs: dict[str, TrainSpec]  # per configured type: expert_spec with its name, seed and KIND_SPECS
    heldout_per_kind: int  # held-out screens per type for the reported accuracy; validation uses as many
    attempts: int


@dataclass
class BuildReport:
    rows: list[dict[str, object]]
    seconds: float

    def table(self) -> str:
        lines = [
            f"{'adapter':<14} {'role':<8} {'held-out accuracy':>18} {'characters':>10} {'status':<10} {'seconds':>8}"
        ]
        for r in self.rows:
            acc, chars = r.get("accuracy"), r.get("char_accuracy")
            acc_s = f"{acc:.3f}" if isinstance(acc, float) else "-"
            chars_s = f"{chars:.3f}" if isinstance(chars, float) else "-"
            lines.append(
                f"{r['name']!s:<14} {r['role']!s:<8} {acc_s:>18} {chars_s:>10} {r['status']!s:<10} {r['seconds']!s:>8}"
            )
        lines.append(f"total {self.seconds:.1f}s")
        return "\n".join(lines)


def plan(
    cfg: DeploymentConfig, steps_scale: float = 1.0, heldout_per_kind: int = 50, attempts: int = ATTEMPTS
) -> DemoPlan:
    kinds = tuple(k for k in SCREEN_TYPES if k in cfg.all_adapters)
    scale = max(steps_scale, 0.0)

    def scaled(spec: TrainSpec) -> TrainSpec:
        return replace(spec, steps=max(1, round(spec.steps * scale)))

    # a type's seed is its place among the configured types: ocr, appended last, moves no other seed
    specs = {
        k: scaled(replace(EXPERT_SPEC, name=k, seed=EXPERT_SPEC.seed + i, **KIND_SPECS.get(k, {})))
        for i, k in enumerate(kinds)
    }
    return DemoPlan(
        router=cfg.router.adapter,
        kinds=kinds,
        router_spec=scaled(ROUTER_SPEC),
        expert_spec=scaled(EXPERT_SPEC),
        expert_specs=specs,
        heldout_per_kind=heldout_per_kind,
        attempts=max(1, attempts),
    )


def _code_digest() -> str:
    h = hashlib.sha256()
    for mod in (screens, train, sys.modules[__name__]):
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()


def _build_key(
    cfg: DeploymentConfig, role: Role, name: str, spec: TrainSpec, kinds: tuple[str, ...], attempts: int
) -> str:
    base = Path(resolve_model_path(cfg.base_model))
    weights = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    parts = {
        "role": role,
        "name": name,
        "spec": asdict(spec),
        "kinds": kinds,
        "selection": {"attempts": attempts, "accept": ACCEPT[role], "stride": SEED_STRIDE},
        "base": [sha256_file(w) for w in weights] or cfg.base_model.id,
        "pixels": [cfg.limits.min_pixels, cfg.limits.max_pixels, cfg.base_model.image_patch_size],
        "system_prompt": cfg.system_prompt if role == "expert" else "",
        "router_prompt": cfg.router.prompt if role == "router" else "",
        "code": _code_digest(),
        "torch": torch.__version__,
        "peft": importlib.metadata.version("peft"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def build_demo(
    cfg: DeploymentConfig,
    work_dir: Path,
    *,
    steps_scale: float = 1.0,
    heldout_per_kind: int = 50,
    attempts: int = ATTEMPTS,
    say: Callable[[str], None] | None = None,
) -> BuildReport:
    """Train and deploy what is missing or changed; print a progress line per stage."""
    out = say or print
    t_all = time.perf_counter()
    p = plan(cfg, steps_scale, heldout_per_kind, attempts)
    storage = Storage.from_config(cfg.storage)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    path = resolve_model_path(cfg.base_model)
    out(f"[demo] base model ready: {path} ({time.perf_counter() - t0:.1f}s)")
    rows: list[dict[str, object]] = []
    jobs: list[tuple[Role, str, TrainSpec]] = []
    if p.router:
        jobs.append(("router", p.router, p.router_spec))
    jobs += [("expert", k, p.expert_specs[k]) for k in p.kinds]
    for role, name, spec in jobs:
        spec = replace(spec, name=name)
        t0 = time.perf_counter()
        key = _build_key(cfg, role, name, spec, p.kinds, p.attempts)
        current = storage.current_version(role, name)
        meta = storage.read_json(role, name, METADATA, current) if current else {}
        if meta.get("build_key") == key:
            out(f"[demo] {name}: unchanged (version {current})")
            rows.append(
                {
                    "name": name,
                    "role": role,
                    "accuracy": meta.get("eval_accuracy"),
                    "char_accuracy": meta.get("char_accuracy"),
                    "status": "unchanged",
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            continue
        folder = work_dir / f"{name}-{key[:16]}"  # trained once per build key, reusable by any storage
        marker = folder / EVAL_FILE
        if marker.exists():
            result = json.loads(marker.read_text())
            out(f"[demo] {name}: trained earlier ({folder}); deploying")
        else:
            result = _train_select_eval(cfg, p, role, name, spec, folder, out)
            marker.write_text(json.dumps(result))  # written last: a folder without it is incomplete
        acc = float(result["accuracy"])
        extra = {
            "build_key": key,
            "heldout_size": result["n"],
            "validation_accuracy": result["validation_accuracy"],
            "train_seed": result["seed"],
            "attempts": result["attempts"],
        }
        if result.get("char_accuracy") is not None:  # reading experts: eval_accuracy is the exact match
            extra["char_accuracy"] = result["char_accuracy"]
        res = deploy_adapter(
            storage,
            cfg,
            name,
            folder,
            role=role,
            eval_accuracy=acc,
            dataset_name=DATASET,
            extra_metadata=extra,
        )
        secs = round(time.perf_counter() - t0, 1)
        chars = result.get("char_accuracy")
        chars_s = f", character accuracy {chars:.3f}" if chars is not None else ""
        out(
            f"[demo] {name}: held-out accuracy {acc:.3f}{chars_s} on {result['n']} screens; deployed {res.version} ({secs}s)"
        )
        rows.append(
            {
                "name": name,
                "role": role,
                "accuracy": acc,
                "char_accuracy": chars,
                "status": "built",
                "seconds": secs,
            }
        )
    _publish_probes(storage, cfg, p.kinds, out)
    return BuildReport(rows, time.perf_counter() - t_all)


def _publish_probes(
    storage: Storage, cfg: DeploymentConfig, kinds: tuple[str, ...], out: Callable[[str], None]
) -> None:
    """The demo's merge probe sets: held-out screens of each expert's type, and a mix as the default set."""
    n = cfg.merge.num_probes
    sets = {k: split("heldout", n, (k,)) for k in kinds}
    sets[cfg.merge.probe_set] = split("heldout", max(1, -(-n // max(1, len(kinds)))), kinds)[:n]
    for name, screens_ in sets.items():
        probes = [(s.image, s.prompt) for s in screens_]
        with tempfile.TemporaryDirectory(prefix="demo-probes-") as tmp:
            files = write_probe_folder(Path(tmp), probes)
            hashes = {f.name: sha256_file(f) for f in files.iterdir()}
        current = storage.current_version("probes", name)
        if current is not None and storage.manifest("probes", name, current)["files"] == hashes:
            continue
        out(f"[demo] probes/{name}: published version {publish_probes(storage, name, probes)}")


def _train_select_eval(
    cfg: DeploymentConfig,
    p: DemoPlan,
    role: Role,
    name: str,
    spec: TrainSpec,
    folder: Path,
    out: Callable[[str], None],
) -> dict[str, Any]:
    """Train up to ``p.attempts`` seeds, keep the best on the validation split, measure it on held-out."""
    kinds = p.kinds if role == "router" else (name,)
    if role == "router":
        examples = [(s, cfg.router.prompt, s.kind) for s in split("train", TRAIN_PER_KIND[role], kinds)]
        system = ""
    else:
        n = KIND_TRAIN.get(name, TRAIN_PER_KIND[role])
        examples = [(s, s.prompt, s.answer) for s in split("train", n, kinds)]
        system = cfg.system_prompt
    bank = FeatureBank(cfg, examples, system_prompt=system, clean=spec.warmup_clean > 0, name=name)
    engine = Engine.load(cfg.engine_settings, name="demo-eval")
    validation = split("validation", p.heldout_per_kind, kinds)

    def scores(adapter: str, screens_: list[screens.Screen]) -> tuple[float, float | None]:
        """Accuracy (exact match for experts), and character accuracy for reading experts."""
        if role == "router":
            return evaluate_router(engine, adapter, list(p.kinds), cfg.router.prompt, screens_), None
        if name in READING_TYPES:
            return evaluate_reader(engine, adapter, screens_)
        return evaluate_expert(engine, adapter, screens_), None

    shutil.rmtree(folder, ignore_errors=True)  # a folder without its eval file is a killed build's
    tried: list[tuple[float, int, Path]] = []
    for attempt in range(p.attempts):
        seed = spec.seed + SEED_STRIDE * attempt
        where = folder.with_name(f"{folder.name}.attempt{attempt}")
        shutil.rmtree(where, ignore_errors=True)
        out(
            f"[demo] {name}: training {role} adapter, attempt {attempt + 1}/{p.attempts} (seed {seed}, {spec.steps} steps)"
        )

        def progress(step: int, loss: float) -> None:
            out(f"[demo] {name}: step {step + 1}/{spec.steps} loss {loss:.3f}")

        train_adapter(cfg, replace(spec, seed=seed), bank, where, progress=progress)
        engine.load_adapter(f"attempt{attempt}", where)
        val = scores(f"attempt{attempt}", validation)[0]
        engine.unload_adapter(f"attempt{attempt}")
        tried.append((val, attempt, where))
        if val >= ACCEPT[role]:
            out(f"[demo] {name}: validation accuracy {val:.3f} >= {ACCEPT[role]:.2f}")
            break
        out(
            f"[demo] {name}: validation accuracy {val:.3f} < {ACCEPT[role]:.2f}"
            + ("; retrying with the next seed" if attempt + 1 < p.attempts else "; keeping the best attempt")
        )
    val, attempt, best = max(tried, key=lambda t: (t[0], -t[1]))  # best validation, earliest on a tie
    for _, _, where in tried:
        if where != best:
            shutil.rmtree(where, ignore_errors=True)
    best.rename(folder)
    engine.load_adapter(name, folder)
    heldout = split("heldout", p.heldout_per_kind, kinds)
    acc, chars = scores(name, heldout)
    return {
        "accuracy": acc,
        "char_accuracy": chars,
        "n": len(heldout),
        "validation_accuracy": val,
        "seed": spec.seed + SEED_STRIDE * attempt,
        "attempts": len(tried),
    }


def evaluate_demo(
    cfg: DeploymentConfig, heldout_per_kind: int = 50, offset: int = 0
) -> list[dict[str, object]]:
    """Re-measure routing and expert accuracy from what is deployed in storage."""
    p = plan(cfg, heldout_per_kind=heldout_per_kind)
    storage = Storage.from_config(cfg.storage)
    engine = Engine.load(cfg.engine_settings, name="demo-eval")
    rows: list[dict[str, object]] = []
    if p.router and storage.current_version("router", p.router):
        engine.load_adapter(p.router, storage.fetch("router", p.router)[0])
        screens_ = split("heldout", heldout_per_kind, p.kinds, offset)
        rows.append(
            {
                "name": p.router,
                "role": "router",
                "n": len(screens_),
                "accuracy": evaluate_router(engine, p.router, list(p.kinds), cfg.router.prompt, screens_),
            }
        )
    for k in p.kinds:
        if storage.current_version("expert", k) is None:
            continue
        engine.load_adapter(k, storage.fetch("expert", k)[0])
        screens_ = split("heldout", heldout_per_kind, (k,), offset)
        row: dict[str, object] = {"name": k, "role": "expert", "n": len(screens_)}
        if k in READING_TYPES:
            row["accuracy"], row["char_accuracy"] = evaluate_reader(engine, k, screens_)
            row["base_accuracy"], row["base_char_accuracy"] = evaluate_reader(engine, None, screens_)
        else:
            row["accuracy"] = evaluate_expert(engine, k, screens_)
            row["base_accuracy"] = evaluate_expert(engine, None, screens_)
        rows.append(row)
    return rows
