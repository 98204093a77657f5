"""The decode step's overhead: operations launched per step, and decode time, eager against compiled.

``python -m benchmarks --only step``. On a CPU with the tiny model, dispatch is most of a decode step, as
it is for the 8B on an H100 (about 4,200 launches a step with adapters against a ~5 ms memory floor), so
the operations a step launches are the proxy this measures:

- aten operations per decode step (the torch profiler's top-level ``aten::`` events, i.e. what Python
  and the compiled graph launch; their nested calls are not counted again), for the whole step and for
  one decoder layer, with base rows only and with 8 rows of 8 adapters; also without view operations
  (``view``, ``reshape``, ``transpose``...: metadata, no kernel);
- the compiled graph's own kernels called per step (inductor's C++ kernels, which the profiler lists
  only with kernel profiling on; they are launches too, so the compiled step's total is both);
- what a LoRA slotted linear adds to a decoder layer (8 mixed adapters minus base, over its 7 linears);
- decode ms per step at batch 1 and 16 for the base model, a merged adapter and the dynamic (slots)
  path, one adapter and 8 mixed, every mode measured in the same interleaved rounds.

The eager path before this change (commit 6c90bfd: LoRA as per-composition gathered weights and a mask,
variable-shape step) measured 330 operations per step (94 in a decoder layer) for base rows and 375.75
(120.25) for 8 mixed adapters, batch 8, with this same counter; those are the "before" figures.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.core import Samples, make_loras
from merge_jobs.merge import merge_loaded
from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest
from moe_core.engine.scheduler import Scheduler
from moe_core.generation import SamplingParams

__all__ = ["BEFORE", "step_benchmarks", "timed_steps"]

logger = logging.getLogger(__name__)

MODES = ("eager", "compile")
#: Measured at 6c90bfd with :func:`_count` (batch 8): operations per decode step, and in one decoder layer.
BEFORE = {"base": (330.0, 94.0), "mixed8": (375.75, 120.25)}
_VIEWS = {
    "aten::view",
    "aten::reshape",
    "aten::_unsafe_view",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::transpose",
    "aten::permute",
    "aten::expand",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::t",
    "aten::alias",
    "aten::detach",
    "aten::lift_fresh",
    "aten::view_as",
}


def _kernels(prof: Any) -> int:
    """Calls of a compiled graph's own kernels (inductor's C++ kernels, listed with kernel profiling on)."""
    return sum("cpp_fused" in ev.name for ev in prof.events())


def _count(prof: Any, inside: str | None = None, *, views: bool = True) -> int:
    n = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::") or (not views and ev.name in _VIEWS):
            continue
        parent, nested, found = ev.cpu_parent, False, inside is None
        while parent is not None:
            nested = nested or parent.name.startswith("aten::")
            found = found or parent.name == inside
            parent = parent.cpu_parent
        n += (not nested) and found
    return n


@contextmanager
def _layer_marker(engine: Engine) -> Iterator[None]:
    """Profiler ranges named ``LAYER0`` around the first decoder layer's forwards."""
    layer = engine._top().model.language_model.layers[0]
    open_ranges: list[Any] = []
    pre = layer.register_forward_pre_hook(
        lambda m, a: open_ranges.append(torch.autograd.profiler.record_function("LAYER0").__enter__())
    )
    post = layer.register_forward_hook(lambda m, a, o: open_ranges.pop().__exit__(None, None, None))
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def _decoding(engine: Engine, reqs: list[GenerationRequest], tokens: int) -> Scheduler:
    """A scheduler whose rows have all read their prompts: every further step decodes only."""
    sched = Scheduler(engine, name="step-bench", max_running=len(reqs))
    for i, r in enumerate(reqs):
        sched.enqueue(
            r, SamplingParams(max_tokens=tokens, min_tokens=tokens), lambda _: None, request_id=f"s{i}"
        )
    while sched._waiting or not all(s.prefilled for s in sched._running):
        sched.iterate()
    return sched


def _step_ops(engine: Engine, reqs: list[GenerationRequest], steps: int = 4) -> dict[str, float]:
    sched = _decoding(engine, reqs, steps + 4)
    sched.iterate()  # warm: the bucket compiled
    with (
        _layer_marker(engine),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        for _ in range(steps):
            sched.iterate()
    while sched.iterate():
        pass
    return {
        "step": _count(prof) / steps,
        "layer": _count(prof, "LAYER0") / steps,
        "step_no_views": _count(prof, views=False) / steps,
        "layer_no_views": _count(prof, "LAYER0", views=False) / steps,
        "compiled_kernels": _kernels(prof) / steps,
    }


def timed_steps(sched: Scheduler, steps: int) -> list[float]:
    """The times of the scheduler's next ``steps`` steps; then it runs its rows to their end."""
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sched.iterate()
        out.append(time.perf_counter() - t0)
    while sched.iterate():
        pass
    return out


def _step_times(engine: Engine, reqs: list[GenerationRequest], steps: int) -> list[float]:
    return timed_steps(_decoding(engine, reqs, steps + 2), steps)


def step_benchmarks(
    cfg: DeploymentConfig, *, quick: bool = False, modes: tuple[str, str] = MODES
) -> tuple[Samples, dict[str, Any]]:
    """Every figure for the eager step and ``modes[1]`` (``compile``; the smoke test runs ``static``,
    the same padded step uncompiled, to spare a compile per bucket)."""
    settings = cfg.engine_settings
    other = modes[1]
    rounds, steps, big = (1, 3, 4) if quick else (6, 16, 16)
    with tempfile.TemporaryDirectory() as tmp:
        loras = make_loras(cfg, Path(tmp), 8, rank=16)
        merging = Engine.load(settings, name="merge", dtype=torch.float32)
        merging.load_adapter("a0", loras[0])
        merged_dir = Path(tmp) / "merged"
        merge_loaded(merging, "a0", safe_merge=True).save_pretrained(merged_dir, safe_serialization=True)
        merging.processor.save_pretrained(merged_dir)
        engines: dict[tuple[str, str], Engine] = {}
        for mode in modes:
            s = settings.model_copy(update={"kv": settings.kv.model_copy(update={"step": mode})})
            engines["base", mode] = Engine.load(s, name=f"base-{mode}")
            engines["merged", mode] = Engine.load(s, merged_dir, name=f"merged-{mode}")
            dynamic = engines["dynamic", mode] = Engine.load(s, name=f"dynamic-{mode}")
            dynamic.set_lora_slots(8, 16)
            for i, p in enumerate(loras):
                dynamic.load_adapter(f"a{i}", p)
    from benchmarks.__main__ import _demo_inputs

    images, prompt = _demo_inputs(big)

    def batch(n: int, adapters: list[str | None]) -> list[GenerationRequest]:
        return [
            GenerationRequest(images[i % len(images)], prompt, adapters[i % len(adapters)]) for i in range(n)
        ]

    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # the compiled kernels' calls show in the profiler

    figures: dict[str, Any] = {}
    mixes: dict[str, list[str | None]] = {"base": [None], "mixed8": [f"a{i}" for i in range(8)]}
    for mode in modes:
        dyn = engines["dynamic", mode]
        t0 = time.perf_counter()
        _step_times(dyn, batch(1, ["a0"]), 1)  # first use of a bucket compiles it (compile mode)
        figures[f"first_step_s_{mode}"] = time.perf_counter() - t0
        for label, adapters in mixes.items():
            ops = _step_ops(dyn, batch(8, adapters))  # compiles this bucket first (compile mode)
            for k, v in ops.items():
                figures[f"ops_{k}_{label}_{mode}"] = v
        added = figures[f"ops_layer_no_views_mixed8_{mode}"] - figures[f"ops_layer_no_views_base_{mode}"]
        figures[f"ops_lora_per_slotted_linear_{mode}"] = added / 7
        figures[f"ops_lora_per_slotted_linear_with_views_{mode}"] = (
            figures[f"ops_layer_mixed8_{mode}"] - figures[f"ops_layer_base_{mode}"]
        ) / 7
    for label, (step, layer) in BEFORE.items():
        figures[f"ops_step_{label}_before"] = step
        figures[f"ops_layer_{label}_before"] = layer
    variants = {
        "base_b1": ("base", batch(1, [None])),
        "merged_b1": ("merged", batch(1, [None])),
        "dynamic_b1": ("dynamic", batch(1, ["a0"])),
        "base_b16": ("base", batch(big, [None])),
        "merged_b16": ("merged", batch(big, [None])),
        "dynamic_b16": ("dynamic", batch(big, ["a0"])),
        "mixed8_b16": ("dynamic", batch(big, [f"a{i}" for i in range(8)])),
    }
    for mode in modes:  # warm every bucket and shape the measured steps meet
        for kind, reqs in variants.values():
            _step_times(engines[kind, mode], reqs, steps)
    graphs = counters["stats"]["unique_graphs"]
    samples: Samples = {}
    for _ in range(rounds):  # interleaved: the machine's drift falls on every variant alike
        for name, (kind, reqs) in variants.items():
            for mode in modes:
                samples.setdefault(f"step_{name}_{mode}", []).extend(
                    _step_times(engines[kind, mode], reqs, steps)
                )
    figures["compiles_during_timing"] = counters["stats"]["unique_graphs"] - graphs
    med = {k: statistics.median(v) for k, v in samples.items()}
    for mode in modes:
        figures[f"dynamic/merged decode step b1 {mode}"] = (
            med[f"step_dynamic_b1_{mode}"] / med[f"step_merged_b1_{mode}"]
        )
        figures[f"mixed8/single throughput b16 {mode}"] = (
            med[f"step_dynamic_b16_{mode}"] / med[f"step_mixed8_b16_{mode}"]
        )
    for name in variants:
        figures[f"{other}/eager decode step {name}"] = med[f"step_{name}_{other}"] / med[f"step_{name}_eager"]
    for label in ("base", "mixed8"):
        aten = figures[f"ops_step_{label}_{other}"]
        launched = aten + figures[f"ops_compiled_kernels_{label}_{other}"]
        figures[f"aten ops per step, before/{other}, {label}"] = BEFORE[label][0] / aten
        figures[f"aten ops + compiled kernels per step, before/{other}, {label}"] = (
            BEFORE[label][0] / launched
        )
    logger.info("step: %s", figures)
    return samples, figures
