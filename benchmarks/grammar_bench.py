"""What constrained decoding costs (``python -m benchmarks --only grammar``).

* decode step time at batch 8 with every row free, half of them constrained, and all of them
  constrained (a JSON schema of a list of computer-use actions, llguidance), interleaved, on the
  engine's scheduler: the per-token cost of rows in a batch with constrained rows against an all-free
  batch (target: at most 10% more), and the strictest reading (the extra time charged to the
  constrained rows alone);
* the grammar's own share: mask time per constrained token (computing the row's allowed-token mask and
  applying it to its logits), as the engine's counters measure it;
* grammar compile time of a typical action schema and of a tool-call grammar (cache off), and of a
  cache hit.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from benchmarks.core import Samples
from benchmarks.step_bench import timed_steps
from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest, SamplingParams, Scheduler
from moe_core.engine.constraints import Grammars
from moe_core.structured import Constraint, ToolSpec

__all__ = ["ACTION_SCHEMA", "grammar_benchmarks"]

logger = logging.getLogger(__name__)

#: A computer-use action, the typical schema an agent sends.
ACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "action": {"enum": ["click", "double_click", "type", "scroll", "key", "wait"]},
        "x": {"type": "integer", "minimum": 0, "maximum": 1920},
        "y": {"type": "integer", "minimum": 0, "maximum": 1080},
        "text": {"type": "string", "maxLength": 32},
    },
    "required": ["action", "x", "y"],
    "additionalProperties": False,
}
#: Long enough that no row's grammar ends within the measured tokens: a plan of 8 actions.
PLAN_SCHEMA: dict[str, Any] = {"type": "array", "items": ACTION_SCHEMA, "minItems": 8, "maxItems": 8}
BATCH = 8


def _steps(engine: Engine, constrained: int, tokens: int, prompt: str) -> list[float]:
    """Seconds per decode step of a batch of ``BATCH`` rows, ``constrained`` of them under the plan grammar."""
    sched = Scheduler(engine, max_running=BATCH, max_queued=BATCH, name="grammar-bench")
    plan = Constraint.json_schema(PLAN_SCHEMA, "bench")
    for i in range(BATCH):
        params = SamplingParams(
            max_tokens=tokens + 2, ignore_eos=True, constraint=plan if i < constrained else None
        )
        sched.enqueue(GenerationRequest(None, f"{prompt} {i}"), params, lambda _: None, request_id=str(i))
    while not sched.history or len(sched.history[-1].decode) < BATCH:  # prefill: every row decoding after
        sched.iterate()
    return timed_steps(sched, tokens)


def grammar_benchmarks(cfg: DeploymentConfig, *, quick: bool = False) -> tuple[Samples, dict[str, Any]]:
    engine = Engine.load(cfg.engine_settings, name="grammar-bench")
    rounds, tokens = (2, 8) if quick else (8, 32)
    samples: Samples = {"grammar_step_free": [], "grammar_step_half": [], "grammar_step_all": []}
    prompt = "Plan the next actions on the screen"
    _steps(engine, BATCH, 4, prompt)  # warm-up: the grammar compiled once, cached after
    before = dict(engine.grammars.stats)
    for _ in range(rounds):  # interleaved: the machine's drift falls on all three alike
        samples["grammar_step_free"] += _steps(engine, 0, tokens, prompt)
        samples["grammar_step_half"] += _steps(engine, BATCH // 2, tokens, prompt)
        samples["grammar_step_all"] += _steps(engine, BATCH, tokens, prompt)
    stats = engine.grammars.stats
    masked = max(1, stats["grammar_masked_tokens"] - before["grammar_masked_tokens"])
    path_s = (stats["grammar_mask_us"] - before["grammar_mask_us"]) / 1e6 / masked
    fill_s = (stats["grammar_fill_us"] - before["grammar_fill_us"]) / 1e6 / masked
    free, half, full = (statistics.median(samples[k]) for k in samples)
    figures: dict[str, Any] = {
        "grammar_batch": BATCH,
        "grammar_vocab": engine.grammars.vocab,
        "grammar_step_free_ms": free * 1e3,
        "grammar_step_half_ms": half * 1e3,
        "grammar_step_all_ms": full * 1e3,
        # per constrained token: computing its mask (on the grammar thread, during the forward) and the
        # step's wait for it, unpacking and applying it
        "grammar_mask_fill_per_token_us": fill_s * 1e6,
        "grammar_mask_apply_per_token_us": path_s * 1e6,
        # per token at batch 8: every row of a batch gets one token a step, so a row's cost per token is the
        # step's time over the rows; constrained and free rows of one batch pay the same step
        "grammar_per_token_half_constrained_vs_free": half / free,
        "grammar_per_token_all_constrained_vs_free": full / free,
        # the strictest reading: all of the half-constrained step's extra time charged to its 4 constrained
        # rows (a free row charged only its share of the all-free step)
        "grammar_constrained_row_charged_all_extra": 1 + (half - free) / (BATCH // 2) / (free / BATCH),
    }
    figures.update(_compile_times(engine, 5 if quick else 30))
    logger.info("grammar: %s", figures)
    return samples, figures


def _compile_times(engine: Engine, n: int) -> dict[str, float]:
    """Median compile time (cache off) of the action schema and of a tool-call grammar; a cache hit."""
    fresh = Grammars(engine.processor.tokenizer, engine.grammars.vocab, engine.eos_token_ids, capacity=0)
    action = Constraint.json_schema(ACTION_SCHEMA, "bench")
    tool = Constraint.tool_calls([ToolSpec("computer", ACTION_SCHEMA)], parallel=True, param="bench")

    def median_ms(grammars: Grammars, c: Constraint) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            grammars.compile(c)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    cached = Grammars(
        engine.processor.tokenizer,
        engine.grammars.vocab,
        engine.eos_token_ids,
        capacity=engine.settings.kv.grammar_cache_size,
    )
    cached.compile(action)
    return {
        "grammar_compile_action_schema_ms": median_ms(fresh, action),
        "grammar_compile_tool_call_ms": median_ms(fresh, tool),
        "grammar_cache_hit_ms": median_ms(cached, action),
    }
