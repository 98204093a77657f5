"""The inference engine: Qwen3-VL chat prompts, many LoRA adapters in one batch, a paged KV cache.

One module per concern: :mod:`~moe_core.engine.request` (what goes in and out),
:mod:`~moe_core.engine.prompts` (chat template, tokens, images, positions),
:mod:`~moe_core.engine.kv` (pages, block tables, prefix sharing),
:mod:`~moe_core.engine.attention` (attention over the pages),
:mod:`~moe_core.engine.vision_cache` (image features by content and vision identity),
:mod:`~moe_core.engine.runner` (one packed forward), :mod:`~moe_core.engine.sequence` (a request's
tokens, pages and progress), :mod:`~moe_core.engine.planner` (what runs in each step: admission,
chunked prefill, preemption), :mod:`~moe_core.engine.scheduler` (the queue, its thread and the asyncio
API), :mod:`~moe_core.engine.outputs` (logits to tokens, text and finishes),
:mod:`~moe_core.engine.sampling`, :mod:`~moe_core.engine.constraints` (grammars),
:mod:`~moe_core.engine.lora` (adapter slots), :mod:`~moe_core.engine.core` (the :class:`Engine` that
holds them together) and :mod:`~moe_core.engine.reference` (its Hugging Face reference paths).
"""

from moe_core.engine.core import Engine
from moe_core.engine.prompts import TEMPLATE_CACHE_SIZE, TEXT_PLACEHOLDER, Prompt, PromptBuilder
from moe_core.engine.request import (
    BASE,
    ChatProcessor,
    Classification,
    Completion,
    Delta,
    EngineError,
    GenerationRequest,
    GenerationResult,
    InvalidInput,
    PromptTooLong,
    QueueFull,
    Timings,
    Turn,
    VisionLanguageModel,
)
from moe_core.engine.sampling import FinishReason, SamplingParams
from moe_core.engine.scheduler import Scheduler, StepRecord, run_batch

__all__ = [
    "BASE",
    "TEMPLATE_CACHE_SIZE",
    "TEXT_PLACEHOLDER",
    "ChatProcessor",
    "Classification",
    "Completion",
    "Delta",
    "Engine",
    "EngineError",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "InvalidInput",
    "Prompt",
    "PromptBuilder",
    "PromptTooLong",
    "QueueFull",
    "SamplingParams",
    "Scheduler",
    "StepRecord",
    "Timings",
    "Turn",
    "VisionLanguageModel",
    "run_batch",
]
