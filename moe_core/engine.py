"""The inference engine: Qwen3-VL chat prompts, greedy generation, many LoRA adapters in one batch.

One :class:`Engine` owns one model (a base model with any number of PEFT adapters attached, or a
merged model). :meth:`Engine.generate` runs a list of requests whose rows may each name a different
adapter (or none) in a single ``generate`` call through PEFT's ``adapter_names``; each row's output
equals that row run alone. :meth:`Engine.classify` scores a label set in one forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from moe_core import vision
from moe_core.config import EngineSettings
from moe_core.lora_slots import LoraSlots, SlotError
from moe_core.vision import PixelBounds

__all__ = [
    "BASE",
    "ChatProcessor",
    "ClassifyResult",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "VisionLanguageModel",
]

logger = logging.getLogger(__name__)

#: PEFT's name for "no adapter" in a mixed batch.
BASE = "__base__"
#: Where the user's text goes in the rendered chat template; a special token no processor expands.
PROMPT_SLOT = "<|vision_pad|>"


class EngineError(RuntimeError):
    """A request the engine cannot run (unknown adapter, bad input)."""


@dataclass(frozen=True)
class GenerationRequest:
    image: Image.Image
    prompt: str
    adapter: str | None = None
    max_new_tokens: int | None = None
    bounds: PixelBounds | None = None  # this image's pixel bounds; None: the engine's


@dataclass(frozen=True)
class GenerationResult:
    text: str
    adapter: str | None
    num_tokens: int
    batch_size: int
    adapters_in_batch: int
    latency_s: float
    prompt_tokens: int = 0  # the row's prompt, image tokens and chat template included


@dataclass(frozen=True)
class ClassifyResult:
    label: str
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)


class VisionLanguageModel(Protocol):
    """What the engine uses of a transformers image-text-to-text model (bare, PEFT-wrapped or merged)."""

    def __call__(self, **inputs: Any) -> Any: ...
    def generate(self, **inputs: Any) -> torch.Tensor: ...
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...
    def eval(self) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...
    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any: ...


class ChatProcessor(Protocol):
    """What the engine uses of a transformers processor: its tokenizer, chat template and batching."""

    tokenizer: Any

    def __call__(self, **kwargs: Any) -> Any: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...
    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any: ...


class Engine:
    """Generation on one model; thread-safe (one forward at a time)."""

    def __init__(
        self,
        model: VisionLanguageModel,
        processor: ChatProcessor,
        settings: EngineSettings,
        *,
        name: str = "engine",
    ) -> None:
        self.model = model
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.settings = settings
        # prompt_tokens() runs on the caller's thread while a forward tokenizes under the lock; a Rust
        # tokenizer used from two threads at once fails ("Already borrowed"), so counting has its own copy
        self._counting = copy.deepcopy(processor.tokenizer)
        self._template_tokens: dict[str, int] = {}  # chat template length by system prompt
        self.system_prompt = settings.system_prompt
        self._template_length(
            self.system_prompt
        )  # counted now: the first request's check never waits for a forward
        self.max_new_tokens = settings.max_new_tokens
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
        self._lock = threading.Lock()
        self.slots: LoraSlots | None = None  # stacked LoRA slots, when serving many adapters (set_lora_slots)
        self.device = next(model.parameters()).device
        self.forwards = 0  # generate/forward calls run, for metrics and tests

    @classmethod
    def load(
        cls,
        settings: EngineSettings,
        path: str | Path | None = None,
        *,
        name: str = "engine",
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> Engine:
        """The base model (or the model folder ``path``, e.g. a merged model) with its processor."""
        from moe_core.modeling import load_model, load_processor

        model = load_model(settings.base_model, path, dtype=dtype, device=device)
        return cls(model, load_processor(settings.base_model, path), settings, name=name)

    @property
    def _peft(self) -> Any:
        """The model as PEFT sees it (attached adapters, set_adapter, ...): untyped by PEFT itself."""
        return self.model

    # --------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters attached to the model."""
        if self.slots is not None:
            return sorted(n for n in self.slots.names if n is not None)
        cfg = getattr(self.model, "peft_config", None)
        return sorted(cfg) if cfg else []

    def set_lora_slots(self, slots: int, max_rank: int) -> None:
        """Serve adapters from ``slots`` stacked slots of rank up to ``max_rank`` (:mod:`moe_core.lora_slots`):
        a mixed batch costs two matmuls per layer instead of PEFT's loop over adapters. Called again,
        it resizes; loaded adapters stay. PEFT's own layers (training, merging) are not used then."""
        from moe_core.modeling import SERVED_TARGETS

        with self._lock:
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
        """Attach a PEFT LoRA folder under ``name`` (replacing an attached adapter of that name)."""
        from peft import PeftModel

        t0 = time.perf_counter()
        with self._lock:
            if self.slots is not None:
                try:
                    slot = self.slots.load(name, path)
                except SlotError as e:
                    raise EngineError(str(e)) from e
                logger.info(
                    "%s: adapter %s loaded into slot %d in %.3fs",
                    self.name,
                    name,
                    slot,
                    time.perf_counter() - t0,
                )
                return
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
            self.model.eval()
        logger.info("%s: adapter %s loaded from %s in %.3fs", self.name, name, path, time.perf_counter() - t0)

    def unload_adapter(self, name: str) -> None:
        """Detach ``name``; safe to call twice or for a name never loaded."""
        with self._lock:
            if self.slots is not None:
                self.slots.unload(name)
            elif name in self.adapters:
                self._delete(name)
                logger.info("%s: adapter %s unloaded", self.name, name)

    def merge_adapter(self, name: str, *, safe_merge: bool = True) -> VisionLanguageModel:
        """Merge adapter ``name`` into the weights and return the merged model, which the engine now serves.

        The other attached adapters are dropped. With ``safe_merge``, NaN/Inf in a layer's LoRA
        delta or in the merged weights raise :class:`EngineError` naming the layer; nothing is merged then.
        Merge in fp32 (load the engine that way) and cast afterwards: a bf16 merge drifts.
        """
        with self._lock:
            if self.slots is not None:
                raise EngineError(f"{self.name}: merging needs PEFT's layers; this engine serves from slots")
            if name not in self.adapters:
                raise EngineError(f"adapter {name!r} is not loaded (loaded: {self.adapters})")
            if safe_merge:
                for module_name, module in self._peft.named_modules():
                    lora = hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {})
                    if lora and not torch.isfinite(module.get_delta_weight(name)).all():
                        raise EngineError(f"layer {module_name} has NaN/Inf in its LoRA delta")
            try:
                merged = self._peft.merge_and_unload(safe_merge=safe_merge, adapter_names=[name])
            except ValueError as e:  # PEFT's safe_merge: "NaNs detected in the merged weights"
                raise EngineError(str(e)) from e
            bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise EngineError(f"merged weights hold NaN/Inf in {bad[:3]}")
            self.model = merged.eval()
            return self.model

    def _delete(self, name: str) -> None:
        if len(self.adapters) == 1:  # PEFT keeps one active adapter; drop the wrapper instead
            self.model = self._peft.unload()
        else:
            if name in getattr(self.model, "active_adapters", []):
                other = next(a for a in self.adapters if a != name)
                self._peft.set_adapter(other)
            self._peft.delete_adapter(name)

    # ----------------------------------------------------------------- inputs
    def _messages(self, image: Image.Image | None, prompt: str, system_prompt: str) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}],
            },
        ]

    def prepare_image(self, image: Image.Image, bounds: PixelBounds | None = None) -> Image.Image:
        """RGB, resized as Qwen does (:mod:`moe_core.vision`): aspect kept, on the patch grid, within bounds."""
        return vision.prepare(image, bounds or self.bounds, self.patch_size)

    def prompt_tokens(self, prompt: str, image_tokens: int, system_prompt: str | None = None) -> int:
        """Tokens of the chat prompt for ``prompt`` with an image of ``image_tokens`` tokens, counted
        without the image's pixels (the processor expands the one image placeholder to that many).
        Raises ``UnicodeEncodeError`` for text that is not valid unicode (a lone surrogate).

        Safe beside a running forward: it uses its own tokenizer copy and a template length counted
        once (a Rust tokenizer must not be used from two threads at once)."""
        system = self.system_prompt if system_prompt is None else system_prompt
        template = self._template_tokens.get(system)
        if template is None:  # another system prompt than the engine's (counted in __init__)
            with self._lock:
                template = self._template_length(system)
        prompt.encode("utf-8")  # a lone surrogate fails here, with the reason
        ids = self._counting(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return template - 2 + len(ids) + image_tokens  # the prompt and image placeholders replaced

    def _template_length(self, system: str) -> int:
        """Tokens of the chat template around one prompt and one image placeholder (cached per system prompt)."""
        text = self.processor.apply_chat_template(
            self._messages(None, PROMPT_SLOT, system), add_generation_prompt=True, tokenize=False
        )
        n = self._template_tokens[system] = len(self._counting(text)["input_ids"])
        return n

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The user's text as text: a special-token string in it (``<|im_start|>``) is never a control token."""
        prompt.encode("utf-8")  # a lone surrogate fails here, before the processor
        ids: list[int] = self.processor.tokenizer(
            prompt, add_special_tokens=False, split_special_tokens=True
        )["input_ids"]
        return ids

    def encode(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        system_prompt: str | None = None,
        answers: Sequence[str] | None = None,
        padding_side: str = "left",
        bounds: Sequence[PixelBounds | None] | None = None,
    ) -> Any:
        """Tokenize chat prompts with images; with ``answers``, append them as the assistant turn.

        Each image is resized by :meth:`prepare_image` (within its ``bounds``, default the engine's) and
        reaches the processor with resizing off: qwen-vl-utils is the one resizer.
        """
        system = self.system_prompt if system_prompt is None else system_prompt
        per_image = bounds if bounds is not None else [None] * len(images)
        ready = [self.prepare_image(im, b) for im, b in zip(images, per_image, strict=True)]
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        text = self.processor.apply_chat_template(
            self._messages(ready[0] if ready else None, PROMPT_SLOT, system),
            add_generation_prompt=True,
            tokenize=False,
        )
        texts = [text] * len(ready) if answers is None else [text + a for a in answers]
        self.processor.tokenizer.padding_side = padding_side
        try:
            batch = self.processor(
                text=texts, images=ready, padding=True, do_resize=False, return_tensors="pt"
            )
        finally:
            self.processor.tokenizer.padding_side = "left"
        return self._splice(batch, prompt_ids, padding_side).to(self.device)

    def _splice(self, batch: Any, prompt_ids: Sequence[list[int]], padding_side: str) -> Any:
        """Put each row's prompt tokens where the template has its placeholder, and pad the rows again.

        The chat template is rendered around :data:`PROMPT_SLOT` and the prompt is tokenized on its own
        as text (:meth:`_prompt_ids`); the template ends at special tokens on both sides of the user's
        text, so an ordinary prompt gets exactly the ids it would get inline.
        """
        tok = self.processor.tokenizer
        slot = tok.convert_tokens_to_ids(PROMPT_SLOT)
        rows: dict[str, list[torch.Tensor]] = {"input_ids": [], "mm_token_type_ids": []}
        keys = [k for k in rows if k in batch]
        for i, ids in enumerate(prompt_ids):
            real = batch["attention_mask"][i].bool()
            seq = batch["input_ids"][i][real]
            (where,) = (seq == slot).nonzero(as_tuple=True)
            p = int(where[0])
            text = torch.tensor(ids, dtype=seq.dtype)
            for k in keys:
                row = batch[k][i][real]
                insert = text if k == "input_ids" else torch.zeros(len(ids), dtype=row.dtype)
                rows[k].append(torch.cat([row[:p], insert, row[p + 1 :]]))
        width = max(len(r) for r in rows["input_ids"])
        for k in keys:
            fill = tok.pad_token_id if k == "input_ids" else 0
            padded = torch.full((len(prompt_ids), width), fill, dtype=rows[k][0].dtype)
            mask = torch.zeros((len(prompt_ids), width), dtype=batch["attention_mask"].dtype)
            for i, r in enumerate(rows[k]):
                if padding_side == "left":
                    padded[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
                else:
                    padded[i, : len(r)], mask[i, : len(r)] = r, 1
            batch[k] = padded
            batch["attention_mask"] = mask
        return batch

    def _adapter_kwargs(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        """PEFT's per-row ``adapter_names`` (the mixed-batch path); see :meth:`adapter_context`."""
        loaded = set(self.adapters)
        missing = sorted({a for a in adapters if a is not None and a not in loaded})
        if missing:
            raise EngineError(f"adapters {missing} are not loaded (loaded: {sorted(loaded)})")
        if not loaded:
            return {}
        return {"adapter_names": [a if a is not None else BASE for a in adapters]}

    @contextlib.contextmanager
    def adapter_context(self, adapters: Sequence[str | None]) -> Iterator[dict[str, Any]]:
        """Forward kwargs for rows using ``adapters``. Not thread-safe: hold the engine lock, or call from one thread.

        With LoRA slots every row reads its own slot in one pass. Otherwise (PEFT), one adapter for the
        whole batch takes PEFT's plain path (``set_adapter``), no adapter at all runs with adapters
        disabled, and only a batch that mixes adapters pays for PEFT's per-adapter dispatch.
        """
        if self.slots is not None:
            missing = sorted({a for a in adapters if a is not None and a not in self.slots.names})
            if missing:
                raise EngineError(f"adapters {missing} are not loaded (loaded: {self.adapters})")
            with self.slots.rows(adapters):
                yield {}
            return
        kwargs = self._adapter_kwargs(adapters)
        distinct = set(adapters)
        if not kwargs or len(distinct) > 1:
            yield kwargs
            return
        (only,) = distinct
        if only is None:
            with self._peft.disable_adapter():
                yield {}
        else:
            self._peft.set_adapter(only, inference_mode=True)
            yield {}

    # ------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self, requests: Sequence[GenerationRequest], *, exact_tokens: int | None = None
    ) -> list[GenerationResult]:
        """Run all requests in one ``generate`` call; rows may name different adapters.

        ``exact_tokens`` makes every row generate that many tokens, end of sequence or not (benchmarks).
        """
        if not requests:
            return []
        t0 = time.perf_counter()
        max_new = exact_tokens or max(r.max_new_tokens or self.max_new_tokens for r in requests)
        fixed = {"min_new_tokens": exact_tokens} if exact_tokens else {}
        with self._lock, self.adapter_context([r.adapter for r in requests]) as kwargs:
            inputs = self.encode(
                [r.image for r in requests], [r.prompt for r in requests], bounds=[r.bounds for r in requests]
            )
            # inputs.input_ids: [batch, prompt_len] -> out: [batch, prompt_len + new]
            out = self.model.generate(**inputs, **kwargs, **fixed, max_new_tokens=max_new, do_sample=False)
            self.forwards += 1
        new = out[:, inputs["input_ids"].shape[1] :]
        dt = time.perf_counter() - t0
        n_adapters = len({r.adapter for r in requests})
        results = []
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        for r, row, n_in in zip(requests, new, prompt_lengths, strict=True):
            row = row[: exact_tokens or r.max_new_tokens or self.max_new_tokens]
            text = self.processor.tokenizer.decode(row, skip_special_tokens=True).strip()
            n = int((row != self.processor.tokenizer.pad_token_id).sum())
            results.append(GenerationResult(text, r.adapter, n, len(requests), n_adapters, dt, int(n_in)))
        logger.debug(
            "%s: generated %d rows (%d adapters: %s) in %.3fs",
            self.name,
            len(requests),
            n_adapters,
            sorted({str(r.adapter) for r in requests}),
            dt,
        )
        return results

    @torch.inference_mode()
    def logits(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """Next-token logits over each request's prompt, in fp32: ``[batch, prompt_len, vocab]``."""
        with self._lock, self.adapter_context([r.adapter for r in requests]) as kwargs:
            inputs = self.encode(
                [r.image for r in requests], [r.prompt for r in requests], bounds=[r.bounds for r in requests]
            )
            out = self.model(**inputs, **kwargs).logits.float()
            self.forwards += 1
        return out

    @torch.inference_mode()
    def image_features(self, inputs: Mapping[str, Any]) -> Any:
        """The vision tower's output for encoded inputs (pooled features and deepstack features)."""
        with self._lock:
            inner: Any = getattr(
                self._peft, "model", self.model
            )  # Qwen3-VL: <ForConditionalGeneration>.model
            return inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

    @torch.inference_mode()
    def classify(
        self,
        image: Image.Image,
        prompt: str,
        labels: Sequence[str],
        adapter: str | None,
        system_prompt: str = "",
        bounds: PixelBounds | None = None,
    ) -> ClassifyResult:
        """Score the label set as the assistant's answer; one forward pass.

        When every label starts with a different token, one batch-1 forward scores them all from the
        next-token distribution; otherwise one batched forward scores each label's full token sequence.
        """
        if not labels:
            raise EngineError("classify needs at least one label")
        tok = self.processor.tokenizer
        with self._lock, self.adapter_context([adapter]) as kwargs:  # the tokenizer is the lock holder's too
            label_ids = [tok.encode(lbl, add_special_tokens=False) for lbl in labels]
            firsts = [ids[0] for ids in label_ids]
            if len(set(firsts)) == len(firsts):
                inputs = self.encode([image], [prompt], system_prompt, bounds=[bounds])
                logits = self.model(**inputs, **kwargs).logits[0, -1]  # [vocab]
                scores = torch.log_softmax(logits.float(), -1)[firsts]
            else:
                scores = self._score_sequences(
                    image, prompt, labels, label_ids, kwargs, system_prompt, bounds
                )
            self.forwards += 1
        probs = torch.softmax(scores, -1).tolist()
        best = max(range(len(labels)), key=lambda i: probs[i])
        return ClassifyResult(labels[best], probs[best], dict(zip(labels, probs, strict=True)))

    def _score_sequences(
        self,
        image: Image.Image,
        prompt: str,
        labels: Sequence[str],
        label_ids: list[list[int]],
        kwargs: dict[str, Any],
        system_prompt: str,
        bounds: PixelBounds | None,
    ) -> torch.Tensor:
        n = len(labels)
        inputs = self.encode(
            [image] * n,
            [prompt] * n,
            system_prompt,
            answers=labels,
            padding_side="right",
            bounds=[bounds] * n,
        )
        if "adapter_names" in kwargs:
            kwargs = {"adapter_names": kwargs["adapter_names"] * n}
        logp = torch.log_softmax(self.model(**inputs, **kwargs).logits.float(), -1)  # [n, len, vocab]
        lengths = inputs["attention_mask"].sum(-1)
        out = []
        for i, ids in enumerate(label_ids):
            end = int(lengths[i])
            pos = range(end - len(ids) - 1, end - 1)
            out.append(sum(float(logp[i, p, t]) for p, t in zip(pos, ids, strict=True)))
        return torch.tensor(out)
