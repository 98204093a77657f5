"""Engine-level measurements, taken side by side and interleaved so the noise of a shared machine cancels.

Every figure is a list of samples; the report gives p50 (and p99 where asked) and ratios between
variants measured in the same rounds.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.stats import p50, p99
from merge_jobs.merge import merge_loaded
from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest
from moe_core.modeling import LM_TARGETS

__all__ = ["BenchSettings", "Samples", "engine_benchmarks", "make_loras", "p50", "p99"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    rounds: int = 20
    new_tokens: int = 16
    batch: int = 16
    adapters_in_batch: int = 8
    memory_points: tuple[int, ...] = (1, 8, 32)
    rank: int = 16


Samples = dict[str, list[float]]


def make_loras(cfg: DeploymentConfig, out: Path, n: int, rank: int, seed: int = 0) -> list[Path]:
    """``n`` random non-zero LoRA adapters on the configured base model (stand-ins for trained ones)."""
    from peft import LoraConfig, get_peft_model

    from moe_core.modeling import load_model

    paths = []
    base = load_model(cfg.base_model)
    for i in range(n):
        torch.manual_seed(seed + i)
        peft = get_peft_model(
            base, LoraConfig(r=rank, lora_alpha=rank, target_modules=LM_TARGETS, init_lora_weights=False)
        )
        p = out / f"lora-{i}"
        peft.save_pretrained(str(p), safe_serialization=True)
        base = peft.unload()
        paths.append(p)
    return paths


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fixed_generate(engine: Engine, reqs: list[GenerationRequest], new_tokens: int) -> None:
    """generate exactly ``new_tokens`` per row (no early stop), as a benchmark needs."""
    engine.generate(reqs, exact_tokens=new_tokens)


def _full_hd_screenshot(rep: EngineReport, engine: Engine, image: Any, prompt: str, s: BenchSettings) -> None:
    """A 1920x1080 screenshot at the Kubernetes config's pixel bounds: its image tokens and latency."""
    from moe_core.vision import plan

    k8s = DeploymentConfig.from_file(Path(__file__).resolve().parents[1] / "config" / "deployment.k8s.yaml")
    shot = image.resize((1920, 1080))
    p = plan(1920, 1080, k8s.engine_settings.bounds, k8s.engine_settings.image_factor)
    rep.figures["1920x1080 at k8s bounds: model size"] = f"{p.model_width}x{p.model_height}"
    rep.figures["1920x1080 at k8s bounds: image tokens"] = p.tokens
    rep.figures["1920x1080 at k8s bounds: prompt tokens"] = engine.prompt_tokens(prompt, p.tokens)
    reqs = [GenerationRequest(shot, prompt, None, bounds=k8s.engine_settings.bounds)]
    _fixed_generate(engine, reqs, s.new_tokens)  # warm-up
    for _ in range(max(2, s.rounds // 2)):
        rep.samples.setdefault("latency_base_1920x1080", []).append(
            _timed(partial(_fixed_generate, engine, reqs, s.new_tokens))
        )


def _continuous_batching(
    rep: EngineReport, engine: Engine, images: list[Any], prompt: str, s: BenchSettings
) -> None:
    """Time to first token under 8 concurrent streams, and a mix of 4- and 64-token requests served by the
    step scheduler against the old whole-batch path (one Hugging Face ``generate`` per batch of 8, every
    row waiting for the batch's longest), all requests arriving at once."""
    import asyncio

    from moe_core.engine.scheduler import Scheduler
    from moe_core.generation import SamplingParams

    sched = Scheduler(engine, max_running=8, max_queued=64)
    streams = [
        GenerationRequest(images[i % len(images)], prompt, f"a{i % s.adapters_in_batch}") for i in range(8)
    ]
    lengths = [4, 64] * (s.batch // 2)
    mix = [
        GenerationRequest(images[i % len(images)], prompt, f"a{i % s.adapters_in_batch}")
        for i in range(len(lengths))
    ]

    async def eight_streams() -> list[float]:
        async def one(r: GenerationRequest) -> float:
            async for d in sched.stream(r, SamplingParams(max_tokens=s.new_tokens, min_tokens=s.new_tokens)):
                if d.timings is not None:
                    return d.timings.ttft_s
            raise RuntimeError("stream ended without timings")

        return list(await asyncio.gather(*(one(r) for r in streams)))

    async def continuous() -> list[float]:
        t0 = time.perf_counter()

        async def one(r: GenerationRequest, n: int) -> float:
            await sched.generate(r, SamplingParams(max_tokens=n, min_tokens=n))
            return time.perf_counter() - t0

        return list(await asyncio.gather(*(one(r, n) for r, n in zip(mix, lengths, strict=True))))

    def whole_batch() -> list[float]:
        t0 = time.perf_counter()
        done: list[float] = []
        for k in range(0, len(mix), 8):
            batch = mix[k : k + 8]
            engine.generate_hf(batch, exact_tokens=max(lengths[k : k + 8]))
            done += [time.perf_counter() - t0] * len(batch)
        return done

    asyncio.run(eight_streams())  # warm-up
    for _ in range(max(2, s.rounds // 4)):
        rep.samples.setdefault("ttft_8_streams", []).extend(asyncio.run(eight_streams()))
        new = asyncio.run(continuous())
        old = whole_batch()
        rep.samples.setdefault("mix_latency_continuous", []).extend(new)
        rep.samples.setdefault("mix_latency_whole_batch", []).extend(old)
        rep.samples.setdefault("mix_makespan_continuous", []).append(max(new))
        rep.samples.setdefault("mix_makespan_whole_batch", []).append(max(old))
    rep.figures["mix: requests (4 and 64 tokens, alternating)"] = len(mix)
    sched.close()


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process(os.getpid()).memory_info().rss) / 2**20


@dataclass
class EngineReport:
    samples: Samples = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def engine_benchmarks(
    cfg: DeploymentConfig, s: BenchSettings, images: list[Any], prompt: str
) -> EngineReport:
    """Items 1, 2, 4 and 5 of the benchmark issue on the configured model."""
    from moe_core.modeling import load_model, load_processor

    rep = EngineReport()
    tmp = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    n_loras = max(s.adapters_in_batch, max(s.memory_points))
    loras = make_loras(cfg, tmp, n_loras, s.rank)
    processor = load_processor(cfg.base_model)

    # prefix caching off: these rounds repeat the same requests, which would otherwise be answered from
    # their own cached pages (kv_bench measures reuse on its own)
    base_settings = cfg.engine_settings
    settings = base_settings.model_copy(
        update={
            "limits": base_settings.limits.model_copy(update={"max_new_tokens": s.new_tokens}),
            "kv": base_settings.kv.model_copy(update={"prefix_caching": False}),
        }
    )

    def engine(model: Any, name: str) -> Engine:
        return Engine(model, processor, settings, name=name)

    base = engine(load_model(cfg.base_model), "base")
    dynamic = engine(load_model(cfg.base_model), "dynamic")  # the served path: LoRA slots
    dynamic.set_lora_slots(s.adapters_in_batch + 2, s.rank)
    peft = engine(load_model(cfg.base_model), "peft")  # PEFT's mixed-batch path, for comparison
    for i in range(s.adapters_in_batch):
        dynamic.load_adapter(f"a{i}", loras[i])
        peft.load_adapter(f"a{i}", loras[i])
    t0 = time.perf_counter()
    merging = Engine.load(settings, name="merge", dtype=torch.float32)
    merging.load_adapter("a0", loras[0])
    merged_model: Any = merge_loaded(merging, "a0", safe_merge=True)
    rep.figures["merge_s"] = time.perf_counter() - t0
    merged = engine(merged_model.to(next(base.model.parameters()).dtype), "merged")

    one = [GenerationRequest(images[0], prompt, None)]
    variants: dict[str, tuple[Engine, list[GenerationRequest]]] = {
        "base": (base, one),
        "merged": (merged, one),
        "dynamic": (dynamic, [GenerationRequest(images[0], prompt, "a0")]),
        "dynamic_peft": (peft, [GenerationRequest(images[0], prompt, "a0")]),
    }
    mixed = [
        GenerationRequest(images[i % len(images)], prompt, f"a{i % s.adapters_in_batch}")
        for i in range(s.batch)
    ]
    single = [GenerationRequest(r.image, prompt, "a0") for r in mixed]
    for _ in range(2):  # warm-up
        for eng, reqs in variants.values():
            _fixed_generate(eng, reqs, s.new_tokens)
    for _ in range(s.rounds):  # item 1: interleaved batch-1 latency, full length and one token
        for name, (eng, reqs) in variants.items():
            rep.samples.setdefault(f"latency_{name}", []).append(
                _timed(partial(_fixed_generate, eng, reqs, s.new_tokens))
            )
            rep.samples.setdefault(f"first_{name}", []).append(_timed(partial(_fixed_generate, eng, reqs, 1)))
    for name in variants:
        rep.samples[f"decode_per_token_{name}"] = [
            (full - first) / (s.new_tokens - 1)
            for full, first in zip(rep.samples[f"latency_{name}"], rep.samples[f"first_{name}"], strict=True)
        ]
    _full_hd_screenshot(rep, base, images[0], prompt, s)

    def serial() -> None:  # the original design: one request at a time, switching the active adapter
        for r in mixed:
            _fixed_generate(peft, [r], s.new_tokens)  # one adapter: PEFT's set_adapter path

    for _ in range(max(2, s.rounds // 4)):  # item 2: throughput of 16 requests over 8 adapters
        rep.samples.setdefault("batch_mixed", []).append(
            _timed(lambda: _fixed_generate(dynamic, mixed, s.new_tokens))
        )
        rep.samples.setdefault("batch_single", []).append(
            _timed(lambda: _fixed_generate(dynamic, single, s.new_tokens))
        )
        rep.samples.setdefault("serial_switching", []).append(_timed(serial))
        rep.samples.setdefault("batch_mixed_peft", []).append(
            _timed(lambda: _fixed_generate(peft, mixed, s.new_tokens))
        )
        rep.samples.setdefault("batch_single_peft", []).append(
            _timed(lambda: _fixed_generate(peft, single, s.new_tokens))
        )
    # item 3 (engine half): router classification against a whole expert request
    labels = [f"a{i}" for i in range(s.adapters_in_batch)]
    for _ in range(s.rounds):
        rep.samples.setdefault("classify", []).append(
            _timed(lambda: dynamic.classify(images[0], cfg.router.prompt, labels, "a1"))
        )
        rep.samples.setdefault("expert_request", []).append(
            _timed(
                lambda: dynamic.generate(
                    [GenerationRequest(images[0], prompt, "a1", max_new_tokens=s.new_tokens)]
                )
            )
        )
    # item 4: cold adapter load + first request against a warm request
    extra = loras[s.adapters_in_batch :] or loras[:1]
    for i, path in enumerate(extra[: max(2, s.rounds // 2)]):
        name = f"cold{i}"
        req = [GenerationRequest(images[0], prompt, name)]

        def cold(path: Path = path, name: str = name, req: list[GenerationRequest] = req) -> None:
            dynamic.load_adapter(name, path)
            _fixed_generate(dynamic, req, s.new_tokens)

        rep.samples.setdefault("cold_request", []).append(_timed(cold))
        rep.samples.setdefault("warm_request", []).append(
            _timed(partial(_fixed_generate, dynamic, req, s.new_tokens))
        )
        dynamic.unload_adapter(name)
    _continuous_batching(rep, dynamic, images, prompt, s)
    del base, merged, variants, merged_model
    gc.collect()
    # item 5: resident memory with 1, 8, 32 adapters
    mem = engine(load_model(cfg.base_model), "memory")
    mem.set_lora_slots(max(s.memory_points), s.rank)  # allocated up front: memory is flat in adapters
    gc.collect()
    rss0 = _rss_mb()
    loaded = 0
    for n in s.memory_points:
        while loaded < n:
            mem.load_adapter(f"m{loaded}", loras[loaded % len(loras)])
            loaded += 1
        _fixed_generate(mem, [GenerationRequest(images[0], prompt, f"m{n - 1}")], 2)
        gc.collect()
        rep.figures[f"rss_mb_{n}_adapters"] = _rss_mb()
    rep.figures["rss_mb_base_engine"] = rss0
    rep.figures["adapter_file_kb"] = (loras[0] / "adapter_model.safetensors").stat().st_size / 1024
    return rep
