"""The GPU benchmark: what production runs, at Qwen3-VL-8B's shapes (random bf16 weights) on one CUDA device.

Production's engine settings (``config/deployment.k8s.yaml``: pixel bounds, 2,048-token prefill steps,
pages of 16 tokens, prefix caching), the step scheduler with requests joining and leaving
(:mod:`benchmarks.gpu_workload`), 1504x832 screenshots (1,222 image tokens each, every one with its own
pixels), the project's LoRA slots (:mod:`moe_core.engine.lora`) holding 8 random adapters with non-zero
B, and a merged model (adapter a0 folded into the weights). For each decode step mode in
``--compare-steps`` (``engine.step``; default eager, then cuda_graphs) it reports decode ms/token at
batch 1, 8 and 32 for base, merged, dynamic with 1 adapter and dynamic with 8 mixed adapters, each as a
multiple of the bandwidth floor (weights one decode step reads / HBM bandwidth: 15.1 GB / 3.35 TB/s =
4.5 ms on an H100), and the time to first token of one 1504x832 screenshot. The weights are created
directly in bf16 on the device; peak memory is counted from after the build.

The GPU machine has Python 3.12, torch 2.11, transformers 5.17, no Ray, no pydantic: the wheels travel
with the run. Here, in a full clone (prepare-wheels.sh appends to .git/info/exclude, which a git worktree
does not have), once::

    bash ../shared/gpu/prepare-wheels.sh    # .whl/: transformers 5.24, peft, pydantic, qwen-vl-utils, ...
    # what it misses: llguidance (moe_core.engine imports it), requests (qwen-vl-utils), httpx2 and its
    # dependencies (huggingface-hub 1.33, when the GPU machine's hub predates it); about 4 MB
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 -d .whl llguidance==1.9.1 \
        requests urllib3 idna charset-normalizer certifi httpx2 httpcore2 anyio h11 truststore

Then on the GPU machine, carrying ``.whl`` (the prefix is the line prepare-wheels.sh prints), one command
of at most 8 minutes (the phases stop at ``--budget-s``, 390 s from the start, and what was measured is
written)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1; \
      timeout 450 python3 -m benchmarks --gpu --out-dir benchmarks/results

It writes ``benchmarks/results/gpu-<device>.{json,md}`` (and a .png where matplotlib is installed).
``python -m benchmarks --gpu --dry-run`` runs the same code on the tiny model's shapes and config on the
CPU (``gpu-dry-run.*``, about 10 s here).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu_env import HOW_TO, check_transformers, hbm_tb_s, missing_modules

STARTED = time.perf_counter()  # the time box counts from here: the imports below take seconds too
check_transformers()  # before the engine's imports: the fix is named instead of a failure deep in transformers
if _missing := missing_modules():
    raise ImportError(f"the GPU benchmark needs {', '.join(_missing)}, not importable here; {HOW_TO}")

import torch  # noqa: E402

# (import lists share a shape with other modules' imports: not a repeated block)
from benchmarks.gpu_model import (  # noqa: E402
    build_model,
    decode_weight_bytes,
    fold_adapter,
    lora_read_bytes,
    qwen3_vl_8b_config,
    tiny_config,
    write_adapters,
)
from benchmarks.gpu_report import write_results  # noqa: E402
from benchmarks.gpu_workload import PROMPT, Screens, run_trace, staggered_trace, ttft, warm_up  # noqa: E402
from benchmarks.stats import p50, p90  # noqa: E402
from moe_core.config import BaseModelConfig, DeploymentConfig, EngineConfig, EngineSettings  # noqa: E402
from moe_core.engine import Engine, GenerationRequest  # noqa: E402
from moe_core.engine.kv import KVLayout  # noqa: E402

__all__ = ["DRY_RUN", "FULL", "GpuPlan", "gpu_benchmarks"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_CONFIG = ROOT / "config" / "deployment.k8s.yaml"
#: The dry run's: the embedded tiny model's own config (its small pixel bounds keep screenshots short).
TINY_CONFIG = ROOT / "config" / "deployment.yaml"


@dataclass(frozen=True)
class GpuPlan:
    """What one run measures; :data:`FULL` fits 8 minutes on an H100, :data:`DRY_RUN` well under one on a CPU."""

    dry_run: bool = False
    batches: tuple[int, ...] = (1, 8, 32)  # the CUDA graph buckets to capture (--engine, once a setting)
    hold: int = 16  # decode steps with the whole batch per trace: tokens per measurement
    rounds: int = 2  # traces per variant and batch size
    ttft_rounds: int = 5
    screenshot: tuple[int, int] = (1504, 832)  # 47 x 26 tokens of 32 px: 1,222 image tokens
    adapters: int = 8
    rank: int = 16
    step: str = "auto"  # engine.step when --compare-steps is empty
    step_modes: tuple[str, ...] = ("eager", "cuda_graphs")
    budget_s: float = 390.0  # seconds from the start; phases not started by then are skipped (and listed)
    hbm_tb_s: float | None = None  # None: from the device's name
    engine: dict[str, Any] = field(default_factory=dict)  # engine.* overrides (validated)


FULL = GpuPlan()
DRY_RUN = GpuPlan(dry_run=True, hold=4, rounds=1, ttft_rounds=2, screenshot=(376, 208), budget_s=240.0)

#: Each variant: the engine it runs on (a plain model, or the model with LoRA slots) and the rows' adapters.
VARIANTS: dict[str, tuple[str, Callable[[int], list[str | None]]]] = {
    "merged": ("plain", lambda n: [None]),
    "base": ("slots", lambda n: [None]),
    "dynamic_1": ("slots", lambda n: ["a0"]),
    "dynamic_8": ("slots", lambda n: [f"a{i}" for i in range(n)]),
}


def _shown(path: Path) -> str:
    """``path`` relative to the project root where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Bench:
    """One run: the shapes, the device, production's settings, and what was measured so far."""

    def __init__(self, plan: GpuPlan, config_path: Path) -> None:
        from moe_core.modeling import load_processor, resolve_dtype, resolve_model_path

        self.plan = plan
        self.t0 = STARTED
        self.device = torch.device("cpu" if plan.dry_run else "cuda")
        self.dtype = resolve_dtype(BaseModelConfig(), self.device)  # bf16 on CUDA, fp32 on the CPU
        self.processor = load_processor(BaseModelConfig())  # the tiny model's: same patch 16, merge 2
        tiny = Path(resolve_model_path(BaseModelConfig()))
        self.config = tiny_config(tiny) if plan.dry_run else qwen3_vl_8b_config(self.processor.tokenizer)
        self.settings = DeploymentConfig.from_file(config_path).engine_settings
        self.screens = Screens(plan.screenshot)
        self.tmp = Path(tempfile.mkdtemp(prefix="moe-gpu-bench-"))
        self.loras: list[Path] = []
        self.skipped: list[str] = []
        name = torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu"
        self.bandwidth = plan.hbm_tb_s or hbm_tb_s(name)
        self.result: dict[str, Any] = {
            "device": name,
            "dry_run": plan.dry_run,
            "plan": asdict(plan),
            "production_config": _shown(config_path),
            "torch_threads": torch.get_num_threads(),
            "decode": {},
            "ttft": {},
            "floor": {"hbm_tb_s": self.bandwidth},
            "memory": {},
            "timings_s": {},
        }

    # ------------------------------------------------------------ helpers
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def late(self, what: str) -> bool:
        """Whether the time box is spent; a phase that is skipped is listed in the results."""
        if time.perf_counter() - self.t0 > self.plan.budget_s:
            self.skipped.append(what)
            logger.warning("time box of %.0f s spent: %s skipped", self.plan.budget_s, what)
            return True
        return False

    def engine_settings(self, mode: str) -> EngineSettings:
        if self.plan.dry_run and mode == "cuda_graphs":  # no CUDA here: the same padded step, uncompiled
            mode = "static"
        kv = EngineConfig.model_validate({**self.settings.kv.model_dump(), **self.plan.engine, "step": mode})
        return self.settings.model_copy(update={"kv": kv})

    def kv_bytes(self) -> int:
        """A KV pool that holds the largest batch's rows at their longest, with room to spare."""
        from moe_core.vision import plan as image_plan

        s = self.settings
        layout = KVLayout.of(self.config.text_config, s.kv.page_tokens, self.dtype, self.device)
        w, h = self.plan.screenshot
        image = image_plan(w, h, s.bounds, s.image_factor).tokens
        batch = max(self.plan.batches)
        tokens = batch * (image + 256 + 2 * batch + self.plan.hold + 2 * s.kv.page_tokens)
        return max(2**26, int(1.5 * tokens * layout.bytes_per_token))

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- phases
    def build(self) -> Any:
        t0 = time.perf_counter()
        model = build_model(self.config, self.dtype, self.device)
        self.sync()
        self.result["timings_s"].setdefault("build", []).append(time.perf_counter() - t0)
        if self.device.type == "cuda":
            self.result["memory"]["model_gb"] = torch.cuda.memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()  # peaks below are the serving's, not the build's
        floor = self.result["floor"]
        if "weights_read_per_step_gb" not in floor:
            weights = decode_weight_bytes(model)
            floor["weights_read_per_step_gb"] = weights / 1e9
            floor["floor_ms"] = weights / (self.bandwidth * 1e12) * 1e3
            floor["parameters_b"] = sum(p.numel() for p in model.parameters()) / 1e9
        if not self.loras:
            t0 = time.perf_counter()
            self.loras = write_adapters(model, self.tmp, self.plan.adapters, self.plan.rank)
            self.result["timings_s"]["write_adapters"] = time.perf_counter() - t0
        return model

    def engine(self, model: Any, mode: str, kind: str) -> Engine:
        eng = Engine(
            model,
            self.processor,
            self.engine_settings(mode),
            name=f"{kind}-{mode}",
            kv_cache_bytes=self.kv_bytes(),
        )
        self.result["memory"]["kv_cache_gb"] = eng.kv.nbytes / 1e9
        if kind == "slots":
            t0 = time.perf_counter()
            eng.set_lora_slots(self.plan.adapters, self.plan.rank)
            for i, path in enumerate(self.loras):
                eng.load_adapter(f"a{i}", path)
            self.result["timings_s"]["load_adapters"] = time.perf_counter() - t0
        return eng

    def decode(self, eng: Engine, mode: str, variant: str, adapters: list[str | None]) -> None:
        """Decode ms/token at each batch size: the p50 of steps with exactly that many decoding rows."""
        plan, floor = self.plan, self.result["floor"]
        bytes_per_token = eng.kv.layout.bytes_per_token
        page_tokens = eng.kv.layout.page_tokens
        for batch in plan.batches:
            if self.late(f"decode {mode} {variant} batch {batch}"):
                continue
            warm_up(eng, adapters, batch, self.sync)
            steps: list[tuple[float, int]] = []
            joins = leaves = 0
            for _ in range(plan.rounds):
                trace = staggered_trace(self.screens, adapters, batch, plan.hold)
                res = run_trace(eng, trace, self.sync, max_steps=8 * (2 * batch + plan.hold) + 32)
                steps += res.decode_steps(batch)
                joins, leaves = joins + res.joins, leaves + res.leaves
            if not steps:
                raise RuntimeError(f"{mode} {variant}: no step ran {batch} decoding rows alone")
            ms = p50([dt for dt, _ in steps]) * 1e3
            distinct = len({adapters[i % len(adapters)] for i in range(batch)} - {None})
            weights = floor["weights_read_per_step_gb"] * 1e9 + lora_read_bytes(eng, distinct)
            kv = p50([pages for _, pages in steps]) * page_tokens * bytes_per_token
            floor_ms = weights / (self.bandwidth * 1e12) * 1e3
            floor_kv_ms = (weights + kv) / (self.bandwidth * 1e12) * 1e3
            self.result["decode"].setdefault(mode, {}).setdefault(variant, {})[str(batch)] = {
                "ms_per_token": ms,
                "p90_ms": p90([dt for dt, _ in steps]) * 1e3,
                "tokens_per_s": batch / ms * 1e3,
                "floor_ms": floor_ms,
                "x_floor": ms / floor_ms,
                "kv_read_gb": kv / 1e9,
                "floor_with_kv_ms": floor_kv_ms,
                "x_floor_with_kv": ms / floor_kv_ms,
                "steps": len(steps),
                "adapters_in_batch": distinct,
                "join_steps": joins,
                "leave_steps": leaves,
            }

    def first_token(self, eng: Engine, mode: str, variant: str, adapter: str | None) -> None:
        """TTFT of one screenshot request on the idle engine, through the serving path."""
        if self.late(f"ttft {mode} {variant}"):
            return

        def request() -> GenerationRequest:
            return GenerationRequest(self.screens.next(), PROMPT, adapter)

        ttft(eng, [request()])  # warm-up: the vision tower's and a long prompt's first run
        samples = ttft(eng, [request() for _ in range(self.plan.ttft_rounds)])
        self.result["ttft"].setdefault(mode, {})[variant] = {
            "ms": p50([c for c, _ in samples]) * 1e3,
            "engine_ms": p50([e for _, e in samples]) * 1e3,
            "samples": len(samples),
        }
        if "screenshot" not in self.result:
            from moe_core.vision import plan as image_plan

            s = self.settings
            w, h = self.plan.screenshot
            p = image_plan(w, h, s.bounds, s.image_factor)
            self.result["screenshot"] = {
                "size": f"{w}x{h}",
                "model_size": f"{p.model_width}x{p.model_height}",
                "image_tokens": p.tokens,
                "prompt_tokens": eng.prompt_tokens(PROMPT, p.tokens),  # the tiny tokenizer's text tokens
            }

    def mode(self, mode: str) -> None:
        """Every variant under one decode step mode, on a model built for it."""
        if self.late(f"step mode {mode}"):
            return
        model = self.build()
        fold_adapter(model, self.loras[0])  # merged: adapter a0 in the weights
        eng = self.engine(model, mode, "plain")
        self.decode(eng, mode, "merged", VARIANTS["merged"][1](self.plan.adapters))
        self.first_token(eng, mode, "merged", None)
        del eng
        self.free()
        fold_adapter(model, self.loras[0], -1.0)
        eng = self.engine(model, mode, "slots")
        for variant, (kind, adapters) in VARIANTS.items():
            if kind == "slots":
                self.decode(eng, mode, variant, adapters(self.plan.adapters))
        self.first_token(eng, mode, "dynamic_1", "a0")
        if self.device.type == "cuda":
            self.result["memory"].setdefault("peak_gb", {})[mode] = torch.cuda.max_memory_allocated() / 1e9
        del eng, model
        self.free()

    def reference_floor(self) -> None:
        """The 8B floor from the 8B shapes on the meta device (no memory): the figure the run is held to."""
        model = build_model(
            qwen3_vl_8b_config(self.processor.tokenizer), torch.bfloat16, torch.device("meta")
        )
        weights = decode_weight_bytes(model)
        self.result["floor"]["qwen3_vl_8b_weights_read_per_step_gb"] = weights / 1e9
        self.result["floor"]["qwen3_vl_8b_floor_ms"] = weights / (self.bandwidth * 1e12) * 1e3


def gpu_benchmarks(plan: GpuPlan, config_path: Path = PRODUCTION_CONFIG) -> dict[str, Any]:
    """Run ``plan``; the results as one JSON-ready dict (see :func:`benchmarks.gpu_report.write_results`)."""
    if not plan.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "--gpu needs a CUDA device; --gpu --dry-run runs the same code on the tiny shapes on the CPU"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    if plan.dry_run:  # tiny shapes gain nothing from threads, and on a shared CPU their spinning costs 10x
        torch.set_num_threads(1)
    bench = Bench(plan, config_path)
    try:
        bench.reference_floor()
        for mode in plan.step_modes or (plan.step,):
            bench.mode(mode)
    except Exception as e:  # a device run is scarce: what was measured before the failure is kept
        logger.exception("GPU benchmark failed")
        bench.result["error"] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(threads)
    bench.result["skipped"] = bench.skipped
    bench.result["seconds"] = time.perf_counter() - bench.t0
    return bench.result


def machine() -> dict[str, Any]:
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def main(args: Any, command: str) -> int:
    """``python -m benchmarks --gpu [--dry-run]``: run, then write the result files."""
    base = DRY_RUN if args.dry_run else FULL
    modes = tuple(m for m in (args.compare_steps or "").split(",") if m)
    plan = GpuPlan(
        **{
            **asdict(base),
            "step": args.step,
            "step_modes": modes if args.compare_steps is not None else base.step_modes,
            "rounds": args.rounds or base.rounds,
            "budget_s": args.budget_s or base.budget_s,
            "hbm_tb_s": args.hbm_tb_s,
            "engine": dict(args.engine or {}),
        }
    )
    config = Path(args.config) if args.config else TINY_CONFIG if plan.dry_run else PRODUCTION_CONFIG
    try:  # the overrides and the step modes are checked before any work
        for mode in plan.step_modes or (plan.step,):
            EngineConfig.model_validate({**EngineConfig().model_dump(), **plan.engine, "step": mode})
    except ValueError as e:
        print(f"python -m benchmarks --gpu: --engine or --compare-steps: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: Any) -> None:
        raise TimeoutError(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)  # `timeout` ends the run: the results so far are still written
    result = gpu_benchmarks(plan, config)
    device = str(result["device"])
    slug = next((k.lower() for k in ("H200", "H100", "A100") if k in device), "cuda")
    name = args.name or ("gpu-dry-run" if plan.dry_run else f"gpu-{slug}")
    result = {"name": name, "command": command, "machine": machine(), **result}
    paths = write_results(result, args.out_dir, name)
    print(json.dumps({"wrote": [str(p) for p in paths], "seconds": round(result["seconds"], 1)}))
    if "error" in result:
        print(f"python -m benchmarks --gpu: {result['error']}", file=sys.stderr)
        return 1
    return 0
