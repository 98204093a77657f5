"""Merge one LoRA into the base weights, verify it against the unmerged adapter, publish it atomically.

Stages (each logged with its duration): load base, load adapter, reference (base + LoRA on the
probes), merge (fp32, safe: NaN/Inf refused naming the adapter and layer), verify (largest logit
difference and greedy agreement against the reference), save, publish (a new version under
``merged/<name>/`` made current by one atomic pointer write). A failed or killed merge never touches
the current version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, EngineError, GenerationRequest
from moe_core.modeling import base_model_id, resolve_device, resolve_dtype
from moe_core.probes import Probe, load_probes
from moe_core.registry import METADATA, adapter_digest, validate_adapter
from moe_core.storage.errors import StorageError
from moe_core.storage.layout import sha256_file
from moe_core.storage.store import Storage

__all__ = ["MERGE_METADATA", "MergeRefused", "MergeResult", "merge_adapter", "merge_loaded"]

logger = logging.getLogger(__name__)

MERGE_METADATA = "merge_metadata.json"


class MergeRefused(RuntimeError):
    """The merge produced something that must not be served; nothing was published."""


@dataclass(frozen=True)
class MergeResult:
    adapter_name: str
    version: str
    changed: bool
    max_logit_diff: float | None
    greedy_agreement: float | None
    seconds: dict[str, float]


@contextlib.contextmanager
def _stage(name: str, stage: str, timings: dict[str, float]) -> Iterator[None]:
    logger.info("merge %s: %s ...", name, stage)
    t0 = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - t0, 4)
    logger.info("merge %s: %s done in %.2fs", name, stage, timings[stage])


def _source(
    storage: Storage, cfg: DeploymentConfig, name: str, checkpoint: Path | None
) -> tuple[Path, dict[str, Any]]:
    if checkpoint is not None:
        validate_adapter(cfg, name, checkpoint)
        return checkpoint, {"source_lora": str(checkpoint)}
    path, version = storage.fetch("expert", name)
    meta = json.loads((path / METADATA).read_text())
    return path, {
        "source_lora": f"{storage.url}/experts/{name}/{version}",
        "source_version": version,
        "source_eval_accuracy": meta.get("eval_accuracy"),
        "source_dataset": meta.get("dataset_name"),
    }


def _logits_and_greedy(
    engine: Engine, probes: Sequence[Probe], adapter: str | None
) -> tuple[torch.Tensor, list[str]]:
    reqs = [GenerationRequest(im, p, adapter) for im, p in probes]
    return engine.logits(reqs), [r.text for r in engine.generate(reqs)]


def check_deltas(engine: Engine, name: str) -> None:
    """Raise :class:`~moe_core.engine.EngineError` naming the first layer whose LoRA delta of ``name``
    holds NaN/Inf (PEFT layers on ``engine``)."""
    peft: Any = engine.model
    with engine.lock:
        for module_name, module in peft.named_modules():
            lora = hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {})
            if lora and not torch.isfinite(module.get_delta_weight(name)).all():
                raise EngineError(f"layer {module_name} has NaN/Inf in its LoRA delta")


def merge_loaded(engine: Engine, name: str, *, safe_merge: bool = True) -> Any:
    """Merge PEFT adapter ``name`` (loaded on ``engine``) into its weights; the engine serves the merged
    model from then on and it is returned. The other attached adapters are dropped.

    With ``safe_merge``, NaN/Inf in a layer's LoRA delta or in the merged weights raise
    :class:`~moe_core.engine.EngineError` naming the layer; nothing is merged then. Merge in fp32 (load
    the engine that way) and cast afterwards: a bf16 merge drifts (peft issues 1388, 2502).
    """
    peft: Any = engine.model
    with engine.lock:
        if engine.slots is not None:
            raise EngineError(f"{engine.name}: merging needs PEFT's layers; this engine serves from slots")
        if name not in engine.adapters:
            raise EngineError(f"adapter {name!r} is not loaded (loaded: {engine.adapters})")
        if safe_merge:
            check_deltas(engine, name)
        try:
            merged = peft.merge_and_unload(safe_merge=safe_merge, adapter_names=[name])
        except ValueError as e:  # PEFT's safe_merge: "NaNs detected in the merged weights"
            raise EngineError(str(e)) from e
        bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise EngineError(f"merged weights hold NaN/Inf in {bad[:3]}")
        engine.replace_model(merged.eval())
        return engine.model


def merge_adapter(
    cfg: DeploymentConfig,
    name: str,
    *,
    checkpoint: Path | None = None,
    safe_merge: bool | None = None,
    storage: Storage | None = None,
) -> MergeResult:
    """Merge ``name`` (from storage, or ``checkpoint``) and publish it unless it is already current."""
    storage = storage or Storage.from_config(cfg.storage)
    storage.check_compare_and_swap()  # a store where two merges could both win is refused before the work
    safe = cfg.merge.safe_merge if safe_merge is None else safe_merge
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    src, source_meta = _source(storage, cfg, name, checkpoint)
    digest = adapter_digest(src)
    base_id = base_model_id(cfg.base_model)
    current = storage.current_version("merged", name)
    if current is not None:
        meta = storage.read_json("merged", name, MERGE_METADATA, current)
        if meta.get("source_adapter_sha256") == digest and meta.get("base_model") == base_id:
            logger.info(
                "merge %s: version %s already merges adapter sha256 %s; nothing to do",
                name,
                current,
                digest[:12],
            )
            return MergeResult(
                name, current, False, meta.get("max_logit_diff"), meta.get("greedy_agreement"), {}
            )

    try:
        probe_set, probes = load_probes(storage, name, cfg.merge.probe_set, cfg.merge.num_probes)
    except StorageError as e:
        raise MergeRefused(f"adapter {name!r}: {e}") from e
    device = resolve_device(cfg.base_model)
    serve_dtype = resolve_dtype(cfg.base_model, device)
    with _stage(name, "load base", timings):  # merged in fp32, cast to the serving dtype afterwards
        engine = Engine.load(
            cfg.engine_settings,
            name=f"merge-{name}",
            dtype=torch.float32,
            device=device,
            kv_cache_bytes=cfg.merge.kv_cache_bytes,
        )
    with _stage(name, "load adapter", timings):
        engine.load_adapter(name, src)
        if safe:  # a broken adapter is refused naming its layer, before its outputs are even computed
            try:
                check_deltas(engine, name)
            except EngineError as e:
                raise MergeRefused(f"adapter {name!r}: {e}; not published") from e
    with _stage(name, "reference", timings):
        ref_logits, ref_texts = _logits_and_greedy(engine, probes, name)
    with _stage(name, "merge", timings):
        try:
            merged = merge_loaded(engine, name, safe_merge=safe)
        except EngineError as e:
            raise MergeRefused(f"adapter {name!r}: {e}; not published") from e
        merged = merged.to(serve_dtype).eval()
        processor = engine.processor
    with _stage(name, "verify", timings):
        engine = Engine(
            merged,
            processor,
            cfg.engine_settings,
            name=f"merged-{name}",
            kv_cache_bytes=cfg.merge.kv_cache_bytes,
        )
        logits, texts = _logits_and_greedy(engine, probes, None)
        max_diff = float((logits - ref_logits).abs().max())
        agreement = sum(a == b for a, b in zip(texts, ref_texts, strict=True)) / len(probes)
        logger.info(
            "merge %s: max logit diff %.3g, greedy agreement %.3f on %d probes",
            name,
            max_diff,
            agreement,
            len(probes),
        )
        if max_diff > cfg.merge.max_logit_diff or agreement < cfg.merge.min_greedy_agreement:
            raise MergeRefused(
                f"adapter {name!r}: merged model differs from base + LoRA (max logit diff {max_diff:.3g} > "
                f"{cfg.merge.max_logit_diff} or greedy agreement {agreement:.3f} < {cfg.merge.min_greedy_agreement}); "
                "not published"
            )
    with tempfile.TemporaryDirectory(prefix=f"merge-{name}-") as tmp:
        out = Path(tmp)
        with _stage(name, "save", timings):
            merged.save_pretrained(out, safe_serialization=True)
            processor.save_pretrained(out)
            metadata = {
                "adapter_name": name,
                "base_model": base_id,
                "base_model_sha256": _base_digest(cfg),
                "merged_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "safe_merge": safe,
                "total_params": sum(p.numel() for p in merged.parameters()),
                "dtype": str(serve_dtype).removeprefix("torch."),
                "source_adapter_sha256": digest,
                "max_logit_diff": max_diff,
                "greedy_agreement": agreement,
                "num_probes": len(probes),
                "probe_set": probe_set,
                "timings_s": timings,
                **source_meta,
            }
            (out / MERGE_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        with _stage(name, "publish", timings):
            # compare-and-swap: a merge that started before another one finished never replaces it
            version = storage.publish("merged", name, out, progress=_progress_logger(name), expect=current)
            storage.prune("merged", name, cfg.storage.keep_versions)
    logger.info("merge %s: published version %s in %.2fs total", name, version, time.perf_counter() - t_all)
    return MergeResult(name, version, True, max_diff, agreement, timings)


def _base_digest(cfg: DeploymentConfig) -> str | None:
    """sha256 of the base weights when they are a local folder (the tiny model, a mounted checkpoint)."""
    from moe_core.modeling import resolve_model_path

    folder = Path(resolve_model_path(cfg.base_model))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    return sha256_file(files[0]) if len(files) == 1 else json.dumps({f.name: sha256_file(f) for f in files})


def _progress_logger(name: str) -> Any:
    last = [0.0]

    def report(done: int, total: int, file: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 2.0 or done == total:
            last[0] = now
            logger.info("merge %s: publishing %.0f%% (%s)", name, 100 * done / max(1, total), file)

    return report


def result_dict(res: MergeResult) -> dict[str, Any]:
    return asdict(res)
