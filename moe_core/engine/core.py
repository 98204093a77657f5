"""The engine: one model, its processor, its LoRA slots, its KV cache pool and its runner.

One :class:`Engine` owns one model (a base model with LoRA slots or PEFT adapters attached, or a merged
model) and what serving it needs: the prompt builder, the paged KV cache (:mod:`moe_core.engine.kv`),
the vision-feature cache and the model runner. The step scheduler (:mod:`moe_core.engine.scheduler`)
decides what runs in each step; :meth:`Engine.generate` runs a list of requests to completion through it.
The Hugging Face paths (:meth:`Engine.generate_hf`, :meth:`Engine.logits`, :meth:`Engine.classify`,
in :mod:`moe_core.engine.reference`) run the model's own forward: the reference the paged path is tested
against, and training's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from moe_core.config import CPU_KV_CACHE_BYTES, EngineSettings
from moe_core.engine import reference
from moe_core.engine.constraints import Grammars
from moe_core.engine.kv import KVCache, KVLayout, PageAllocator
from moe_core.engine.lora import LoraSlots, SlotError, parse_adapter
from moe_core.engine.prompts import PromptBuilder
from moe_core.engine.request import (
    BASE,
    ChatProcessor,
    Classification,
    EngineError,
    GenerationRequest,
    GenerationResult,
    Turn,
    VisionLanguageModel,
)
from moe_core.engine.runner import ModelRunner
from moe_core.engine.sampling import SamplingParams, TokenTexts
from moe_core.engine.scheduler import run_batch
from moe_core.engine.vision_cache import FeatureCache
from moe_core.vision import PixelBounds

__all__ = ["Engine"]

logger = logging.getLogger(__name__)


class Engine:
    """Generation on one model; thread-safe (one forward at a time, under :attr:`lock`)."""

    def __init__(
        self,
        model: VisionLanguageModel,
        processor: ChatProcessor,
        settings: EngineSettings,
        *,
        name: str = "engine",
        kv_cache_bytes: int | None = None,
    ) -> None:
        """``kv_cache_bytes`` overrides the config's KV cache budget (a merge job's or a trainer's engine
        needs a small one, not a serving replica's share of the device)."""
        self.model = model
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.settings = settings
        self.system_prompt = settings.system_prompt
        self.max_new_tokens = settings.limits.max_new_tokens
        self.bounds = settings.bounds
        self.patch_size = settings.base_model.image_patch_size
        ip = getattr(processor, "image_processor", None)
        got = (getattr(ip, "patch_size", self.patch_size), getattr(ip, "merge_size", 2))
        if got != (self.patch_size, 2):
            raise EngineError(
                f"the processor has patch size {got[0]} and spatial merge {got[1]}; the config says "
                f"base_model.image_patch_size {self.patch_size} with qwen-vl-utils' merge of 2"
            )
        self.name = name
        self.lock = threading.RLock()  # one forward (or adapter change) at a time
        self.slots: LoraSlots | None = None  # stacked LoRA slots, when serving many adapters (set_lora_slots)
        self.device = next(model.parameters()).device
        self._loads: Counter[str] = Counter()  # PEFT loads per adapter name: a reload is a new identity
        self.prompts = PromptBuilder(
            processor,
            settings.system_prompt,
            settings.bounds,
            self.patch_size,
            settings.image_factor,
            self._rope_index,
        )
        kv = settings.kv
        dtype = next(model.parameters()).dtype
        text_config = self._top().config.text_config
        layout = KVLayout.of(text_config, kv.page_tokens, dtype, self.device)
        self.kv = KVCache(layout, self._kv_pages(layout, kv_cache_bytes))
        self.pages = PageAllocator(self.kv.pages, prefix_caching=kv.prefix_caching)
        self.features = FeatureCache(kv.vision_cache_images)
        # grammars for constrained rows, over the logits' width; token texts for logprobs, made once each
        self.grammars = Grammars(
            processor.tokenizer,
            int(text_config.vocab_size),
            self.eos_token_ids,
            kv.grammar_cache_size,
            overlap=self.device.type == "cuda",  # masks computed during the forward where the CPU is idle
        )
        self.token_text = TokenTexts(processor.tokenizer)
        self.runner = ModelRunner(
            self.model,
            self.kv,
            self.features,
            self.adapter_context,
            lambda: self.slots,
            self.prompts.make_pixels,
        )
        step = kv.step if kv.step != "auto" else "cuda_graphs" if self.device.type == "cuda" else "eager"
        self.runner.set_step(step)
        logger.info(
            "%s: KV cache of %d pages x %d tokens (%.1f MiB, %d bytes/token)",
            name,
            self.kv.pages,
            layout.page_tokens,
            self.kv.nbytes / 2**20,
            layout.bytes_per_token,
        )

    def _kv_pages(self, layout: KVLayout, budget: int | None) -> int:
        kv = self.settings.kv
        budget = budget or kv.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * kv.kv_cache_memory_fraction)
        pages = layout.pages_for(budget if budget is not None else CPU_KV_CACHE_BYTES)
        if pages < 1:
            raise EngineError(
                f"{self.name}: the KV cache budget holds no page of {layout.bytes_per_page} bytes"
            )
        return pages

    @classmethod
    def load(
        cls,
        settings: EngineSettings,
        path: str | Path | None = None,
        *,
        name: str = "engine",
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        kv_cache_bytes: int | None = None,
    ) -> Engine:
        """The base model (or the model folder ``path``, e.g. a merged model) with its processor."""
        from moe_core.modeling import load_model, load_processor

        model = load_model(settings.base_model, path, dtype=dtype, device=device)
        processor = load_processor(settings.base_model, path)
        return cls(model, processor, settings, name=name, kv_cache_bytes=kv_cache_bytes)

    def _top(self) -> Any:
        """The transformers model under any PEFT wrapper (``<ForConditionalGeneration>``)."""
        model: Any = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _vlm(self) -> Any:
        """The Qwen3-VL model inside (``<ForConditionalGeneration>.model``)."""
        return self._top().model

    def _rope_index(self, ids: torch.Tensor, types: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        positions, _ = self._vlm().get_rope_index(ids, types, grid, attention_mask=torch.ones_like(ids))
        return positions

    # --------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters attached to the model."""
        if self.slots is not None:
            return sorted(n for n in self.slots.names if n is not None)
        cfg = getattr(self.model, "peft_config", None)
        return sorted(cfg) if cfg else []

    def identity(self, adapter: str | None) -> str:
        """What the KV a row computes depends on: the model, and the adapter's content (its version)."""
        if adapter is None:
            return f"{self.name}:base"
        if self.slots is not None:
            return self.slots.identity[adapter]
        return f"{self.name}:peft:{adapter}:{self._loads[adapter]}"

    def vision_identity(self, adapter: str | None) -> str | None:
        """Who shapes an image's features: None (the base tower) or the adapter's identity."""
        if adapter is None:
            return None
        if self.slots is not None:  # (asked from other threads too: an adapter not loaded is None here)
            return self.slots.identity.get(adapter) if adapter in self.slots.vision else None
        return self.identity(adapter)  # PEFT: the active adapter may adapt the tower; never shared

    def set_lora_slots(self, slots: int, max_rank: int) -> None:
        """Serve adapters from ``slots`` stacked slots of rank up to ``max_rank`` (:mod:`moe_core.engine.lora`):
        a mixed batch costs two matmuls per layer instead of PEFT's loop over adapters. Called again,
        it resizes; loaded adapters stay. PEFT's own layers (training, merging) are not used then."""
        from moe_core.modeling import SERVED_TARGETS

        with self.lock:
            if self.slots is None:
                if self.adapters:
                    raise EngineError(
                        f"{self.name}: PEFT adapters {self.adapters} are attached; unload them first"
                    )
                self.slots = LoraSlots(self.model, SERVED_TARGETS, slots, max_rank)  # type: ignore[arg-type]
                logger.info("%s: %d LoRA slots of rank %d", self.name, slots, max_rank)
            elif max_rank != self.slots.max_rank:
                raise EngineError(
                    f"{self.name}: slots have rank {self.slots.max_rank}; cannot change to {max_rank}"
                )
            elif slots != self.slots.slots:
                self.slots.resize(slots)
                logger.info("%s: LoRA slots resized to %d", self.name, slots)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Attach a PEFT LoRA folder under ``name`` (replacing an attached adapter of that name). With
        slots, the files are read and checked before the engine's lock; only the copy runs under it."""
        from peft import PeftModel

        t0 = time.perf_counter()
        if self.slots is not None:
            try:
                parsed = parse_adapter(name, path)
                with self.lock:
                    if self.slots is None:
                        raise EngineError(f"{self.name}: slots went away")
                    slot = self.slots.install(parsed)
            except SlotError as e:
                raise EngineError(str(e)) from e
            logger.info(
                "%s: adapter %s loaded into slot %d in %.3fs", self.name, name, slot, time.perf_counter() - t0
            )
            return
        with self.lock:
            if name in self.adapters:
                self._delete(name)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model,  # type: ignore[arg-type]
                    str(path),
                    adapter_name=name,
                    is_trainable=False,
                )
                self.runner.model = self.model
            self.model.eval()
            self._loads[name] += 1
        logger.info("%s: adapter %s loaded from %s in %.3fs", self.name, name, path, time.perf_counter() - t0)

    def unload_adapter(self, name: str) -> None:
        """Detach ``name``; safe to call twice or for a name never loaded."""
        with self.lock:
            if self.slots is not None:
                self.slots.unload(name)
            elif name in self.adapters:
                self._delete(name)
                logger.info("%s: adapter %s unloaded", self.name, name)

    def replace_model(self, model: VisionLanguageModel) -> None:
        """Serve ``model`` from now on (a merge's result): cached KV and features were another model's."""
        with self.lock:
            self.model = model
            self.runner.model = model
            self.pages.clear_cache()
            self.features.clear()

    def _delete(self, name: str) -> None:
        peft: Any = self.model
        if len(self.adapters) == 1:  # PEFT keeps one active adapter; drop the wrapper instead
            self.model = peft.unload()
            self.runner.model = self.model
        else:
            if name in getattr(self.model, "active_adapters", []):
                other = next(a for a in self.adapters if a != name)
                peft.set_adapter(other)
            peft.delete_adapter(name)

    def check_adapters(self, adapters: Sequence[str | None]) -> None:
        loaded = set(self.adapters)
        missing = sorted({a for a in adapters if a is not None and a not in loaded})
        if missing:
            raise EngineError(f"adapters {missing} are not loaded (loaded: {sorted(loaded)})")

    @contextlib.contextmanager
    def adapter_context(self, adapters: Sequence[str | None]) -> Iterator[dict[str, Any]]:
        """Forward kwargs for rows using ``adapters`` (Hugging Face's forward: ``[rows, L]`` inputs).
        Hold the engine's lock.

        With LoRA slots every row reads its own slot in one pass. Otherwise (PEFT), one adapter for the
        whole batch takes PEFT's plain path (``set_adapter``), no adapter at all runs with adapters
        disabled, and only a batch that mixes adapters pays for PEFT's per-adapter dispatch.
        """
        self.check_adapters(adapters)
        if self.slots is not None:
            with self.slots.rows(adapters):
                yield {}
            return
        peft: Any = self.model
        if not self.adapters:
            yield {}
            return
        distinct = set(adapters)
        if len(distinct) > 1:
            yield {"adapter_names": [a if a is not None else BASE for a in adapters]}
            return
        (only,) = distinct
        if only is None:
            with peft.disable_adapter():
                yield {}
        else:
            if (
                getattr(peft, "active_adapter", None) != only
            ):  # set_adapter walks every module: only on a change
                peft.set_adapter(only, inference_mode=True)
            yield {}

    # ----------------------------------------------------------------- inputs
    # The engine's face of its PromptBuilder: these methods repeat its signatures (typed, for callers that
    # hold an engine) and hand over; the work is in moe_core/engine/prompts.py, so they are not duplicates.
    def prepare_image(self, image: Image.Image, bounds: PixelBounds | None = None) -> Image.Image:
        return self.prompts.prepare_image(image, bounds)

    def image_tokens(self, image: Image.Image, bounds: PixelBounds | None = None) -> int:
        """What ``image`` costs in the prompt at ``bounds`` (default the engine's), from its size alone."""
        return self.prompts.image_tokens(image, bounds)

    def prompt_tokens(
        self,
        prompt: str,
        image_tokens: int,
        system_prompt: str | None = None,
        turns: Sequence[Turn[Image.Image]] = (),
        tools: str | None = None,
    ) -> int:
        """Tokens of the chat prompt (:meth:`PromptBuilder.prompt_tokens`); safe from any thread."""
        return self.prompts.prompt_tokens(prompt, image_tokens, system_prompt, turns, tools)

    # PromptBuilder.encode's parameters, handed over (the batch then goes to the device): not a duplicate
    def encode(
        self,
        images: Sequence[Image.Image | None],
        prompts: Sequence[str],
        system_prompt: str | None = None,
        answers: Sequence[str] | None = None,
        padding_side: str = "left",
        bounds: Sequence[PixelBounds | None] | None = None,
        turns: Sequence[Sequence[Turn[Image.Image]]] | None = None,
    ) -> Any:
        """A padded batch for Hugging Face's forward (:meth:`PromptBuilder.encode`), on the model's device."""
        return self.prompts.encode(images, prompts, system_prompt, answers, padding_side, bounds, turns).to(
            self.device
        )

    def _encode_requests(self, requests: Sequence[GenerationRequest]) -> Any:
        return self.encode(
            [r.image for r in requests],
            [r.prompt for r in requests],
            bounds=[r.bounds for r in requests],
            turns=[r.turns for r in requests],
        )

    # ------------------------------------------------------------- generation
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        exact_tokens: int | None = None,
        sampling: Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Run all requests as one batch through the step scheduler (:func:`~moe_core.engine.scheduler.run_batch`);
        rows may name different adapters and sampling settings (default greedy, up to ``max_new_tokens``).

        ``exact_tokens`` makes every row generate that many tokens, end of sequence or not (benchmarks).
        """
        if not requests:
            return []
        t0 = time.perf_counter()
        if sampling is None:
            sampling = [
                SamplingParams(
                    max_tokens=exact_tokens or r.max_new_tokens or self.max_new_tokens,
                    min_tokens=exact_tokens or 0,
                )
                for r in requests
            ]
        done = run_batch(self, requests, sampling)
        dt = time.perf_counter() - t0
        n_adapters = len({r.adapter for r in requests})
        return [
            GenerationResult(
                c.text, r.adapter, c.completion_tokens, len(requests), n_adapters, dt, c.prompt_tokens
            )
            for r, c in zip(requests, done, strict=True)
        ]

    @property
    def forwards(self) -> int:
        """Forwards of the paged runner (steps), for metrics and tests."""
        return self.runner.forwards

    @property
    def vision_images(self) -> int:
        """Images run through the vision tower by the paged runner (not taken from a cache)."""
        return self.runner.vision_images

    def check_device(self) -> None:
        """Raise when the model's device cannot run a tiny computation (a lost or faulted GPU)."""
        x = torch.ones(8, device=self.device)
        if float((x * 2).sum().item()) != 16.0:
            raise EngineError(f"{self.name}: device {self.device} computes wrong results")

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end an answer: the generation config's (``<|im_end|>``, ``<|endoftext|>``)."""
        eos: Any = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        tok_eos = self.processor.tokenizer.eos_token_id
        return sorted({*ids, *([tok_eos] if tok_eos is not None else [])})

    # ------------------------------------------------- Hugging Face's forward
    # (the model's own forward on a padded batch, in moe_core.engine.reference)
    def generate_hf(
        self, requests: Sequence[GenerationRequest], *, exact_tokens: int | None = None
    ) -> list[GenerationResult]:
        """The whole batch in one Hugging Face ``generate`` call (greedy): the reference the paged path is
        tested against (:func:`~moe_core.engine.reference.generate_hf`)."""
        return reference.generate_hf(self, requests, exact_tokens=exact_tokens)

    def logits(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """Next-token logits over each request's prompt, in fp32: ``[batch, prompt_len, vocab]``."""
        return reference.logits(self, requests)

    @torch.inference_mode()
    def image_features(self, inputs: Mapping[str, Any]) -> Any:
        """The vision tower's output for encoded inputs (pooled features and deepstack features)."""
        with self.lock:
            return self._vlm().get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

    # reference.classify's parameters, handed over as generate_hf and logits are: not a duplicate
    def classify(
        self,
        image: Image.Image,
        prompt: str,
        labels: Sequence[str],
        adapter: str | None,
        system_prompt: str = "",
        bounds: PixelBounds | None = None,
    ) -> Classification:
        """Score the label set as the assistant's answer, in one forward pass
        (:func:`~moe_core.engine.reference.classify`)."""
        return reference.classify(self, image, prompt, labels, adapter, system_prompt, bounds)
