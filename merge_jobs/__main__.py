"""Merge-down as a Ray job.

    python -m merge_jobs --adapter-name calendar [--checkpoint PATH] [--no-safe-merge]
    python -m merge_jobs --all-merged                      # every adapter the config marks merged
    python -m merge_jobs --rollback calendar               # make the previous merged version current
    ray job submit --working-dir . -- python -m merge_jobs --adapter-name calendar

Each merge runs in a Ray task with the resources the config gives it (``merge.gpu``/``merge.cpu``);
inside a Ray job ``ray.init()`` joins that cluster, elsewhere it starts a local one. ``--no-ray`` runs
in this process (for debugging).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from merge_jobs.merge import MergeRefused, merge_adapter, result_dict
from moe_core.config import DeploymentConfig
from moe_core.storage.errors import StorageError
from moe_core.storage.store import Storage

logger = logging.getLogger("merge_jobs")


def _merge_one(cfg_json: str, name: str, checkpoint: str | None, safe_merge: bool | None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DeploymentConfig.model_validate_json(cfg_json)
    res = merge_adapter(cfg, name, checkpoint=Path(checkpoint) if checkpoint else None, safe_merge=safe_merge)
    return result_dict(res)


def _run_with_ray(
    cfg: DeploymentConfig, names: list[str], checkpoint: str | None, safe: bool | None
) -> list[Any]:
    import ray

    ray.init(logging_level=logging.WARNING, include_dashboard=False, ignore_reinit_error=True)
    task = ray.remote(_merge_one).options(num_cpus=cfg.merge.cpu, num_gpus=cfg.merge.gpu, max_retries=0)
    refs = [task.remote(cfg.model_dump_json(), n, checkpoint, safe) for n in names]
    results: list[Any] = []
    for name, ref in zip(names, refs, strict=True):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            results.append(e.as_instanceof_cause())
            logger.error("merge %s failed: %s", name, e.as_instanceof_cause())
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m merge_jobs", description="Merge LoRA adapters into the base model."
    )
    p.add_argument("--config", default="config/deployment.yaml")
    p.add_argument("--adapter-name", action="append", default=[], help="adapter to merge (repeatable)")
    p.add_argument("--all-merged", action="store_true", help="every adapter the config marks merged")
    p.add_argument("--checkpoint", help="merge this local PEFT folder instead of the deployed adapter")
    p.add_argument("--no-safe-merge", action="store_true", help="skip the NaN/Inf refusal (not advised)")
    p.add_argument("--no-ray", action="store_true", help="run in this process instead of a Ray task")
    p.add_argument("--rollback", metavar="NAME", help="make the previous merged version of NAME current")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DeploymentConfig.from_file(args.config)
    if args.rollback:
        try:
            v = Storage.from_config(cfg.storage).rollback("merged", args.rollback)
        except (StorageError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{args.rollback}: current merged version is now {v}")
        return 0
    names = list(args.adapter_name)
    if args.all_merged:
        names += [a.name for a in cfg.merged.adapters if a.enabled and a.name not in names]
    if not names:
        p.error("name at least one --adapter-name, or --all-merged")
    if args.checkpoint and len(names) != 1:
        p.error("--checkpoint merges exactly one --adapter-name")
    safe = False if args.no_safe_merge else None
    if args.no_ray:
        results: list[Any] = []
        for n in names:
            try:
                results.append(_merge_one(cfg.model_dump_json(), n, args.checkpoint, safe))
            except (MergeRefused, StorageError, ValueError) as e:
                logger.error("merge %s failed: %s", n, e)
                results.append(e)
    else:
        results = _run_with_ray(cfg, names, args.checkpoint, safe)
    failed = [r for r in results if isinstance(r, BaseException)]
    for r in results:
        if not isinstance(r, BaseException):
            print(json.dumps(r, sort_keys=True))
    for err in failed:
        print(f"error: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
