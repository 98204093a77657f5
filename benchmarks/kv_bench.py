"""Engine v3, part 1: the paged KV cache measured against the v2 engine's contiguous cache and a peer.

* join: what a row joining a running batch costs the rows already there, as the batch grows from 1x64
  to 16x1024 tokens (the v2 engine left-padded and re-concatenated every row's keys and values;
  :func:`v2_join` is its code, run on tensors of the same shapes);
* KV bytes moved per decode step at those sizes (v2: ``torch.cat`` of the whole cache per layer per
  step; v3: the new tokens' keys and values only), on the tiny model and, from the shapes, on the 8B;
* TTFT of turn 5 of a 5-screenshot agent session, with prefix reuse and without (target: >= 3x lower);
* a burst of long screenshot prompts beside short streams: chunked prefill against one-step prefill;
* the peer: transformers' own paged continuous batching (``generate_batch``) on the same token ids.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.core import Samples
from moe_core.config import DeploymentConfig, EngineSettings
from moe_core.engine import Engine, GenerationRequest, SamplingParams, Scheduler, Turn, run_batch

__all__ = ["kv_benchmarks", "v2_decode_write", "v2_join"]

logger = logging.getLogger(__name__)

#: Qwen3-VL-8B's language model: bytes of keys and values per token in bf16 (36 layers, 8 KV heads x 128).
BYTES_PER_TOKEN_8B = 36 * 2 * 8 * 128 * 2


# ------------------------------------------------------------------ the v2 engine's cache, verbatim
def v2_join(
    keys: list[torch.Tensor], values: list[torch.Tensor], new_k: list[torch.Tensor], new_v: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """``KVBatch.join`` of the v2 engine: left-pad the narrower side, concatenate every layer's keys
    and values ``[rows, kv_heads, width, head_dim]``. Returns the new cache and the bytes it wrote."""
    width = max(keys[0].shape[2], new_k[0].shape[2])

    def pad(t: torch.Tensor) -> torch.Tensor:
        missing = width - t.shape[2]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[2] = missing
        return torch.cat([t.new_zeros(shape), t], dim=2)

    out_k = [torch.cat([pad(a), pad(b)]) for a, b in zip(keys, new_k, strict=True)]
    out_v = [torch.cat([pad(a), pad(b)]) for a, b in zip(values, new_v, strict=True)]
    moved = sum(t.numel() * t.element_size() for t in out_k + out_v)
    return out_k, out_v, moved


def v2_decode_write(
    keys: list[torch.Tensor], values: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """One decode step's cache update of the v2 engine (``DynamicCache.update``: ``torch.cat`` along
    the sequence) for one new token per row; returns the new cache and the bytes it wrote."""
    out_k = [torch.cat([k, k[:, :, -1:]], dim=2) for k in keys]
    out_v = [torch.cat([v, v[:, :, -1:]], dim=2) for v in values]
    moved = sum(t.numel() * t.element_size() for t in out_k + out_v)
    return out_k, out_v, moved


def _v2_costs(
    lay: Any, rows: int, width: int, joining: int, rounds: int
) -> tuple[list[float], int, list[float], int]:
    """Times and bytes of the v2 cache's join and decode write for ``rows`` rows ``width`` tokens wide."""
    shape = (rows, lay.kv_heads, width, lay.head_dim)
    keys = [torch.randn(shape, dtype=lay.dtype) for _ in range(lay.layers)]
    values = [torch.randn(shape, dtype=lay.dtype) for _ in range(lay.layers)]
    one = (1, lay.kv_heads, joining, lay.head_dim)
    new_k = [torch.randn(one, dtype=lay.dtype) for _ in range(lay.layers)]
    new_v = [torch.randn(one, dtype=lay.dtype) for _ in range(lay.layers)]
    joins, decodes = [], []
    join_moved = step_moved = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        join_moved = v2_join(keys, values, new_k, new_v)[2]
        joins.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step_moved = v2_decode_write(keys, values)[2]
        decodes.append(time.perf_counter() - t0)
    return joins, join_moved, decodes, step_moved


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _settings(cfg: DeploymentConfig, **kv: Any) -> EngineSettings:
    s = cfg.engine_settings
    limits = s.limits.model_copy(update={"max_prompt_tokens": 100_000})
    return s.model_copy(update={"kv": s.kv.model_copy(update=kv), "limits": limits})


def _pixels(settings: EngineSettings, pixels: int) -> EngineSettings:
    """``settings`` with every image seen at ``pixels`` pixels."""
    limits = settings.limits.model_copy(update={"min_pixels": pixels, "max_pixels": pixels})
    return settings.model_copy(update={"limits": limits})


def _text(n_words: int, i: int) -> str:
    return " ".join(f"w{(i * 7 + k) % 50}" for k in range(n_words))


def _prompt(engine: Engine, n_tokens: int, i: int) -> GenerationRequest:
    """A text-only request whose prompt is about ``n_tokens`` tokens, chat template included."""
    empty = len(engine.prompts.build(GenerationRequest(None, "", None)))
    per_word = (len(engine.prompts.build(GenerationRequest(None, _text(100, i), None))) - empty) / 100
    return GenerationRequest(None, _text(max(1, round((n_tokens - empty) / per_word)), i), None)


# -------------------------------------------------------------------------------- join and decode
def _join_and_decode(
    cfg: DeploymentConfig,
    sizes: list[tuple[int, int]],
    rounds: int,
    samples: Samples,
    figures: dict[str, Any],
) -> None:
    engine = Engine.load(_settings(cfg, prefix_caching=False), name="kv-join", kv_cache_bytes=256 * 2**20)
    lay = engine.kv.layout
    per_token = lay.bytes_per_token
    joiner = _prompt(engine, 64, 99)
    for rows, context in sizes:
        tag = f"{rows}x{context}"
        sched = Scheduler(engine, max_running=rows + 1, name=f"join-{tag}")
        sinks: list[Any] = []
        for i in range(rows):
            sched.enqueue(
                _prompt(engine, context, i),
                SamplingParams(max_tokens=10_000, min_tokens=10_000),
                sinks.append,
                limit=False,
            )
        while not all(s.prefilled for s in sched._running) or sched.queued:
            sched.iterate()
        width = max(len(s.tokens) for s in sched._running)
        figures[f"join {tag}: running context tokens (widest row)"] = width
        joins: list[float] = []
        decodes: list[float] = []
        admits: list[float] = []
        moved_new: list[int] = []
        for _ in range(rounds):
            decodes.append(_timed(sched.iterate))
            sched.enqueue(joiner, SamplingParams(max_tokens=1), sinks.append, limit=False)
            before = engine.kv.bytes_written
            admit = sched._admit
            took: list[float] = []

            def timed_admit(job: Any, admit: Any = admit, took: list[float] = took) -> Any:
                t0 = time.perf_counter()
                seq = admit(job)
                took.append(time.perf_counter() - t0)
                return seq

            sched._admit = timed_admit  # type: ignore[method-assign]
            joins.append(_timed(sched.iterate))  # the join step: the new row's prompt + every row's token
            sched._admit = admit  # type: ignore[method-assign]
            admits += took
            new_row = sched.history[-1].prefill
            joined_tokens = sum(n for _, n in new_row)
            moved_new.append(engine.kv.bytes_written - before - (joined_tokens + rows) * per_token)
            while sched.queued or any(not s.prefilled for s in sched._running):
                sched.iterate()
        samples[f"join_step_minus_decode_{tag}"] = [j - d for j, d in zip(joins, decodes, strict=True)]
        samples[f"join_bookkeeping_v3_{tag}"] = admits
        samples[f"decode_step_v3_{tag}"] = decodes
        figures[f"join {tag}: KV bytes the running rows moved, v3"] = max(moved_new)
        # v2: the same shapes through the v2 engine's code
        joins_v2, join_moved, decodes_v2, step_moved = _v2_costs(
            engine.kv.layout, rows, width, len(engine.prompts.build(joiner)), rounds
        )
        samples[f"join_bookkeeping_v2_{tag}"] = joins_v2
        figures[f"join {tag}: KV bytes moved, v2"] = join_moved
        figures[f"join {tag}: KV bytes moved, v2, 8B shapes"] = (rows + 1) * width * BYTES_PER_TOKEN_8B
        samples[f"decode_kv_write_v2_{tag}"] = decodes_v2
        figures[f"decode {tag}: KV bytes written per step, v2"] = step_moved
        figures[f"decode {tag}: KV bytes written per step, v3"] = rows * per_token
        # the CPU path's SDPA reads each row's pages through a gather (a copy); a paged kernel reads in place
        figures[f"decode {tag}: KV bytes gathered for attention per step, v3 (CPU SDPA path)"] = (
            rows * (width + 1) * per_token
        )
        figures[f"decode {tag}: KV bytes per step, 8B shapes, v2 / v3"] = (
            f"{rows * (width + 1) * BYTES_PER_TOKEN_8B / 1e9:.2f} GB / {rows * BYTES_PER_TOKEN_8B / 1e6:.2f} MB"
        )
        sched.close()


# ------------------------------------------------------------------------------ the agent session
def _session(images: list[Any], answers: list[str], turn: int) -> GenerationRequest:
    turns: list[Turn[Any]] = []
    for k in range(turn):
        turns.append(Turn("user", (images[k], f"Step {k + 1}: what do you click on this screen?")))
        if k < turn - 1:
            turns.append(Turn("assistant", (answers[k],)))
    return GenerationRequest(None, "", None, turns=tuple(turns))


def _agent_ttft(cfg: DeploymentConfig, rounds: int, samples: Samples, figures: dict[str, Any]) -> None:
    """Turns 1-4 run, then turn 5 (five screenshots in its history) is timed to its first token; a first
    session warms up, then ``rounds`` sessions are timed (0: the one session is timed, for the smoke test)."""
    from moe_demo.screens import SCREEN_TYPES, split

    size = (640, 384)  # 20 x 12 = 240 image tokens a screenshot at these bounds
    settings = _settings(cfg)
    settings = _pixels(settings, size[0] * size[1])
    reuse = Engine.load(settings, name="agent-reuse")
    cold = Engine.load(
        settings.model_copy(
            update={"kv": settings.kv.model_copy(update={"prefix_caching": False, "vision_cache_images": 0})}
        ),
        name="agent-cold",
    )
    shots = [s.image.resize(size) for s in split("heldout", rounds + 1, SCREEN_TYPES)]
    first = SamplingParams(max_tokens=1)
    for r in range(rounds + 1):  # the first round warms up
        images = shots[5 * r : 5 * r + 5]  # a new session: five screenshots not seen before
        answers: list[str] = []
        for turn in range(1, 5):
            (done,) = run_batch(reuse, [_session(images, answers, turn)], [SamplingParams(max_tokens=6)])
            answers.append(done.text or "click(1, 1)")
        request = _session(images, answers, 5)
        vision = reuse.vision_images
        timed: list[Any] = []
        t_reuse = _timed(lambda: timed.extend(run_batch(reuse, [request], [first])))  # noqa: B023 (called at once)
        ran = reuse.vision_images - vision
        (warm,) = run_batch(reuse, [request], [SamplingParams(max_tokens=6)])
        t_cold = _timed(lambda: run_batch(cold, [request], [first]))  # noqa: B023 (called at once)
        (fresh,) = run_batch(cold, [request], [SamplingParams(max_tokens=6)])
        if r == 0 and rounds > 0:  # the smoke test (rounds=0) keeps its only session
            continue
        samples.setdefault("agent_turn5_ttft_reuse", []).append(t_reuse)
        samples.setdefault("agent_turn5_ttft_cold", []).append(t_cold)
        figures["agent turn 5: prompt tokens"] = warm.prompt_tokens
        figures["agent turn 5: tokens from the prefix cache"] = timed[0].cached_tokens
        figures["agent turn 5: screenshots through the vision tower, reuse / cold"] = f"{ran} / 5"
        figures["agent turn 5: same answer with and without reuse"] = warm.text == fresh.text


# ------------------------------------------------------------------- a burst beside short streams
def _burst(cfg: DeploymentConfig, n_long: int, samples: Samples, figures: dict[str, Any]) -> None:
    """4 short streams decoding; then 8 long agent prompts (a screenshot and ~1,500 tokens of history
    text each) arrive at once. Chunked prefill (512 tokens a step) against reading each prompt in one
    step: the streams' worst gaps between tokens, and tokens/s over the whole burst."""
    from moe_demo.screens import SCREEN_TYPES, split

    size = (640, 384)  # 240 image tokens
    shots = [s.image.resize(size) for s in split("heldout", 2, SCREEN_TYPES)[:n_long]]
    history = " ".join(f"row {k}: button Save at ({k % 9}, {k % 7}) enabled" for k in range(55))
    for label, budget in (("chunked", 512), ("whole", 1_000_000)):
        # nothing cached: both rounds read every prompt and run every screenshot through the tower
        settings = _settings(
            cfg, max_prefill_tokens_per_step=budget, prefix_caching=False, vision_cache_images=0
        )
        settings = _pixels(settings, size[0] * size[1])
        engine = Engine.load(settings, name=f"burst-{label}", kv_cache_bytes=128 * 2**20)
        sched = Scheduler(engine, max_running=16, name=f"burst-{label}")
        long_reqs = [
            GenerationRequest(shots[i], f"{history}\nStep {i}: what next?", None) for i in range(n_long)
        ]
        for _ in range(2):  # a warm-up, then the measured burst
            prompts = [sched.check(r, limit=False) for r in long_reqs]  # built before: it lands at once
            took, gaps, counted = asyncio.run(_burst_round(sched, long_reqs, prompts))
        samples[f"burst_stream_gap_{label}"] = gaps
        figures[f"burst {label}: tokens/s (prompt + generated)"] = round(counted / took, 1)
        figures[f"burst {label}: worst gap between a stream's tokens (ms)"] = round(1000 * max(gaps), 1)
        figures[f"burst {label}: prompt tokens of each long request"] = len(prompts[0])
        sched.close()


async def _burst_round(
    sched: Scheduler, reqs: list[GenerationRequest], prompts: list[Any]
) -> tuple[float, list[float], int]:
    """One burst: seconds it took, the short streams' gaps between tokens, tokens served."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    streaming = asyncio.Event()
    gaps: list[float] = []
    counted = 0

    async def stream(i: int) -> None:
        nonlocal counted
        last = None
        req = GenerationRequest(None, f"Short question {i}", None)
        async for d in sched.stream(req, SamplingParams(max_tokens=160, min_tokens=160)):
            now = time.perf_counter()
            if last is not None and d.text:
                gaps.append(now - last)
            if d.text:
                last = now
                streaming.set()
            if d.finish_reason:
                counted += d.prompt_tokens + d.completion_tokens

    async def burst() -> None:
        nonlocal counted
        await streaming.wait()  # the streams are decoding when the burst lands
        futures = []
        for r, p in zip(reqs, prompts, strict=True):
            fut: asyncio.Future[Any] = loop.create_future()
            sched.submit(
                r, SamplingParams(max_tokens=4, min_tokens=4), _settle_on_finish(loop, fut), prompt=p
            )
            futures.append(fut)
        for done in await asyncio.gather(*futures):
            counted += done.prompt_tokens + done.completion_tokens

    await asyncio.gather(*(stream(i) for i in range(4)), burst())
    return time.perf_counter() - t0, gaps, counted


def _settle_on_finish(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]) -> Callable[[Any], None]:
    """A scheduler sink that resolves ``fut`` with the final delta (from the scheduler's thread)."""

    def settle(item: Any) -> None:
        if fut.done():
            return
        if isinstance(item, BaseException):
            fut.set_exception(item)
        else:
            fut.set_result(item)

    def put(item: Any) -> None:
        if isinstance(item, BaseException) or item.finish_reason is not None:
            loop.call_soon_threadsafe(settle, item)

    return put


# ------------------------------------------------------------------------------------- the peer
def _peer(cfg: DeploymentConfig, n: int, new_tokens: int, samples: Samples, figures: dict[str, Any]) -> None:
    """The same text-only requests (the same token ids) through transformers' ``generate_batch`` (its
    paged continuous batching, on the CPU) and through this engine, interleaved."""
    from transformers import GenerationConfig

    engine = Engine.load(_settings(cfg, prefix_caching=False), name="peer")
    reqs = [_prompt(engine, 48, i) for i in range(n)]
    ids = [list(engine.prompts.build(r).ids) for r in reqs]
    params = [SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens)] * n
    tok = engine.processor.tokenizer
    gen = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    model: Any = engine.model
    hf_log = logging.getLogger("ContinuousBatchingLogger")
    hf_log.setLevel(logging.ERROR)

    def peer() -> None:
        out = model.generate_batch(inputs=ids, generation_config=gen, progress_bar=False)
        assert sum(len(o.generated_tokens) for o in out.values()) == n * new_tokens

    def ours() -> None:
        done = run_batch(engine, reqs, params)
        assert sum(c.completion_tokens for c in done) == n * new_tokens

    peer()  # warm-up
    ours()
    for _ in range(3):
        samples.setdefault("peer_generate_batch", []).append(_timed(peer))
        samples.setdefault("peer_ours", []).append(_timed(ours))
    total = n * new_tokens
    figures[f"peer: {n} requests x {new_tokens} tokens, generate_batch tok/s"] = round(
        total / statistics.median(samples["peer_generate_batch"]), 1
    )
    figures[f"peer: {n} requests x {new_tokens} tokens, this engine tok/s"] = round(
        total / statistics.median(samples["peer_ours"]), 1
    )


def kv_benchmarks(cfg: DeploymentConfig, *, quick: bool) -> tuple[Samples, dict[str, Any]]:
    samples: Samples = {}
    figures: dict[str, Any] = {}
    sizes = [(1, 64), (4, 256)] if quick else [(1, 64), (4, 256), (8, 512), (16, 1024)]
    rounds = 3 if quick else 25
    torch.manual_seed(0)
    with torch.inference_mode():
        _join_and_decode(cfg, sizes, rounds, samples, figures)
    _agent_ttft(cfg, 0 if quick else 4, samples, figures)
    if not quick:
        _burst(cfg, 8, samples, figures)
    _peer(cfg, 8 if quick else 32, 8 if quick else 32, samples, figures)
    return samples, figures
