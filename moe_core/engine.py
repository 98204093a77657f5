"""The inference engine: Qwen3-VL chat prompts, greedy generation, many LoRA adapters in one batch.

One :class:`Engine` owns one model (a base model with any number of PEFT adapters attached, or a
merged model). :meth:`Engine.generate` runs a list of requests whose rows may each name a different
adapter (or none) in a single ``generate`` call through PEFT's ``adapter_names``; each row's output
equals that row run alone. :meth:`Engine.classify` scores a label set in one forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from moe_core import vision
from moe_core.config import EngineSettings
from moe_core.lora_slots import LoraSlots, SlotError
from moe_core.sampling import SamplingParams
from moe_core.vision import PixelBounds

__all__ = [
    "BASE",
    "ChatProcessor",
    "ChatTurn",
    "ClassifyResult",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "KVBatch",
    "VisionLanguageModel",
]

logger = logging.getLogger(__name__)

#: PEFT's name for "no adapter" in a mixed batch.
BASE = "__base__"
#: Where the user's text goes in the rendered chat template; a special token no processor expands.
PROMPT_SLOT = "<|vision_pad|>"
#: Clients' own system prompts whose chat template length is kept (besides the engine's own).
TEMPLATE_CACHE_SIZE = 64


class EngineError(RuntimeError):
    """A request the engine cannot run (unknown adapter, bad input)."""


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation: ``parts`` are text and images, in order."""

    role: str  # system, user or assistant
    parts: tuple[str | Image.Image, ...]
    inline: bool = False  # the text is the server's own (its system prompt): rendered in the template as is


@dataclass(frozen=True)
class GenerationRequest:
    """One row: ``image`` and ``prompt`` after the system prompt, or a whole conversation (``turns``,
    the engine's system prompt first when it has none of its own)."""

    image: Image.Image | None
    prompt: str
    adapter: str | None = None
    max_new_tokens: int | None = None
    bounds: PixelBounds | None = None  # this row's images' pixel bounds; None: the engine's
    turns: tuple[ChatTurn, ...] = ()
    image_key: str | None = None  # names the image's content: its vision features are reused by key

    def conversation(self, system: str) -> tuple[ChatTurn, ...]:
        if not self.turns:
            image = (self.image,) if self.image is not None else ()
            return (ChatTurn("system", (system,), inline=True), ChatTurn("user", (*image, self.prompt)))
        if self.turns[0].role == "system":
            return self.turns
        return (ChatTurn("system", (system,), inline=True), *self.turns)

    @property
    def images(self) -> list[Image.Image]:
        if not self.turns:
            return [self.image] if self.image is not None else []
        return [p for t in self.turns for p in t.parts if isinstance(p, Image.Image)]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    adapter: str | None
    num_tokens: int
    batch_size: int
    adapters_in_batch: int
    latency_s: float
    prompt_tokens: int = 0  # the row's prompt, image tokens and chat template included


@dataclass
class KVBatch:
    """The attention state of running rows: one KV cache, rows left-padded to a common width.

    Rows join (:meth:`join`, a new prefill) and leave (:meth:`select`) between decode steps; each row
    keeps its own positions, mask and adapter, so its tokens are the ones it would get alone.
    """

    cache: Any  # transformers' DynamicCache: per layer keys/values [rows, kv_heads, width, head_dim]
    mask: torch.Tensor  # [rows, width]: 1 on the row's real tokens
    positions: torch.Tensor  # [rows]: the next token's (text) position
    adapters: list[str | None]
    prompt_tokens: list[int]

    def __len__(self) -> int:
        return len(self.adapters)

    def select(self, keep: Sequence[int]) -> None:
        """Keep rows ``keep`` (in that order), and drop the columns that are padding for all of them."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real = mask.any(0).nonzero()
        first = int(real[0]) if real.numel() else mask.shape[1]
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, first:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, first:]
        self.positions = self.positions.index_select(0, index)
        self.adapters = [self.adapters[i] for i in keep]
        self.prompt_tokens = [self.prompt_tokens[i] for i in keep]

    def join(self, other: KVBatch) -> None:
        """Append ``other``'s rows (left-padding the narrower side)."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.positions = torch.cat([self.positions, other.positions])
        self.adapters += other.adapters
        self.prompt_tokens += other.prompt_tokens


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
        # chat template length by system prompt: the engine's own, and the last few a client sent
        self._template_tokens: OrderedDict[str, int] = OrderedDict()
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
        self.vision_images = 0  # images run through the vision tower (not taken from the feature cache)
        self._features: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self.feature_cache_size = 8  # images whose vision features are kept for reuse (by image_key)
        self._loads: Counter[str] = Counter()  # loads per adapter name: a reload is a new vision identity

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
                self._loads[name] += 1
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
    @staticmethod
    def _template_messages(turns: Sequence[ChatTurn]) -> tuple[list[dict[str, Any]], list[str]]:
        """The chat template's messages with every text part as :data:`PROMPT_SLOT` (and the texts, in order)."""
        messages, texts = [], []
        for turn in turns:
            content: list[dict[str, Any]] = []
            for part in turn.parts:
                if isinstance(part, str) and turn.inline:
                    content.append({"type": "text", "text": part})
                elif isinstance(part, str):
                    texts.append(part)
                    content.append({"type": "text", "text": PROMPT_SLOT})
                else:
                    content.append({"type": "image", "image": part})
            messages.append({"role": turn.role, "content": content})
        return messages, texts

    def _messages(self, image: Image.Image | None, prompt: str, system_prompt: str) -> list[dict[str, Any]]:
        turns = GenerationRequest(image, prompt).conversation(system_prompt)
        return [
            {
                "role": t.role,
                "content": [
                    {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
                    for p in t.parts
                ],
            }
            for t in turns
        ]

    def prepare_image(self, image: Image.Image, bounds: PixelBounds | None = None) -> Image.Image:
        """RGB, resized as Qwen does (:mod:`moe_core.vision`): aspect kept, on the patch grid, within bounds."""
        return vision.prepare(image, bounds or self.bounds, self.patch_size)

    def prompt_tokens(
        self,
        prompt: str,
        image_tokens: int,
        system_prompt: str | None = None,
        turns: Sequence[ChatTurn] = (),
    ) -> int:
        """Tokens of the chat prompt for ``prompt`` (or the conversation ``turns``) with images of
        ``image_tokens`` tokens in all, counted without the images' pixels (the processor expands each
        image placeholder to its tokens). Raises ``UnicodeEncodeError`` for text that is not valid
        unicode (a lone surrogate).

        Safe beside a running forward: it uses its own tokenizer copy and a template length counted
        once (a Rust tokenizer must not be used from two threads at once)."""
        system = self.system_prompt if system_prompt is None else system_prompt
        if turns:
            conversation = GenerationRequest(None, "", turns=tuple(turns)).conversation(system)
            messages, texts = self._template_messages(conversation)
            rendered = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            n_images = sum(1 for t in conversation for p in t.parts if not isinstance(p, str))
            template = len(self._counting(rendered)["input_ids"]) - len(texts) - n_images
            for text in texts:
                text.encode("utf-8")
                template += len(
                    self._counting(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                )
            return template + image_tokens
        counted = self._template_tokens.get(system)
        if counted is None:  # another system prompt than the engine's (counted in __init__)
            with self._lock:
                counted = self._template_length(system)
        else:
            self._template_tokens.move_to_end(system)
        template = counted
        prompt.encode("utf-8")  # a lone surrogate fails here, with the reason
        ids = self._counting(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return template - 2 + len(ids) + image_tokens  # the prompt and image placeholders replaced

    def _template_length(self, system: str) -> int:
        """Tokens of the chat template around one prompt and one image placeholder (cached per system prompt)."""
        messages = self._messages(Image.new("RGB", (1, 1)), PROMPT_SLOT, system)  # renders as one placeholder
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        n = self._template_tokens[system] = len(self._counting(text)["input_ids"])
        while len(self._template_tokens) > TEMPLATE_CACHE_SIZE + 1:  # clients' prompts vary: bounded
            oldest = next(k for k in self._template_tokens if k != self.system_prompt)
            del self._template_tokens[oldest]
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
        images: Sequence[Image.Image | None],
        prompts: Sequence[str],
        system_prompt: str | None = None,
        answers: Sequence[str] | None = None,
        padding_side: str = "left",
        bounds: Sequence[PixelBounds | None] | None = None,
        turns: Sequence[Sequence[ChatTurn]] | None = None,
    ) -> Any:
        """Tokenize chat prompts with images; with ``answers``, append them as the assistant turn.

        Row ``i`` is ``images[i]`` and ``prompts[i]`` after the system prompt, or the conversation
        ``turns[i]`` when given and not empty. Each image is resized by :meth:`prepare_image` (within
        its row's ``bounds``, default the engine's) and reaches the processor with resizing off:
        qwen-vl-utils is the one resizer. Every text part is tokenized on its own, as text.
        """
        system = self.system_prompt if system_prompt is None else system_prompt
        per_row = bounds if bounds is not None else [None] * len(prompts)
        rows = [
            GenerationRequest(im, p, turns=tuple(turns[i]) if turns is not None else ())
            for i, (im, p) in enumerate(zip(images, prompts, strict=True))
        ]
        texts: list[str] = []
        ready: list[Image.Image] = []
        text_ids: list[list[list[int]]] = []
        for i, (row, b) in enumerate(zip(rows, per_row, strict=True)):
            messages, parts = self._template_messages(row.conversation(system))
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            texts.append(text if answers is None else text + answers[i])
            ready.extend(self.prepare_image(im, b) for im in row.images)
            text_ids.append([self._prompt_ids(t) for t in parts])
        self.processor.tokenizer.padding_side = padding_side
        try:
            batch = self.processor(
                text=texts, images=ready or None, padding=True, do_resize=False, return_tensors="pt"
            )
        finally:
            self.processor.tokenizer.padding_side = "left"
        return self._splice(batch, text_ids, padding_side).to(self.device)

    def _splice(self, batch: Any, text_ids: Sequence[list[list[int]]], padding_side: str) -> Any:
        """Put each row's text tokens where the template has its placeholders, and pad the rows again.

        The chat template is rendered with :data:`PROMPT_SLOT` for every text part and each text is
        tokenized on its own as text (:meth:`_prompt_ids`); the template ends at special tokens on both
        sides of a text part, so ordinary text gets exactly the ids it would get inline.
        """
        tok = self.processor.tokenizer
        slot = tok.convert_tokens_to_ids(PROMPT_SLOT)
        rows: dict[str, list[torch.Tensor]] = {"input_ids": [], "mm_token_type_ids": []}
        keys = [k for k in rows if k in batch]
        for i, parts in enumerate(text_ids):
            real = batch["attention_mask"][i].bool()
            seq = batch["input_ids"][i][real]
            (where,) = (seq == slot).nonzero(as_tuple=True)
            if len(where) != len(parts):
                raise EngineError(f"row {i}: {len(where)} text placeholders for {len(parts)} text parts")
            for k in keys:
                row = batch[k][i][real]
                pieces, last = [], 0
                for p, ids in zip(where.tolist(), parts, strict=True):
                    insert = (
                        torch.tensor(ids, dtype=row.dtype)
                        if k == "input_ids"
                        else torch.zeros(len(ids), dtype=row.dtype)
                    )
                    pieces += [row[last:p], insert]
                    last = p + 1
                rows[k].append(torch.cat([*pieces, row[last:]]))
        width = max(len(r) for r in rows["input_ids"])
        for k in keys:
            fill = tok.pad_token_id if k == "input_ids" else 0
            padded = torch.full((len(text_ids), width), fill, dtype=rows[k][0].dtype)
            mask = torch.zeros((len(text_ids), width), dtype=batch["attention_mask"].dtype)
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

    def _encode_requests(self, requests: Sequence[GenerationRequest]) -> Any:
        return self.encode(
            [r.image for r in requests],
            [r.prompt for r in requests],
            bounds=[r.bounds for r in requests],
            turns=[r.turns for r in requests],
        )

    # ------------------------------------------------------- step primitives
    def _vlm(self) -> Any:
        """The Qwen3-VL model inside (``<ForConditionalGeneration>.model``), under any PEFT wrapper."""
        model: Any = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model.model

    def _vision_identity(self, adapter: str | None) -> tuple[str, int] | None:
        """Who shapes an image's features: None (the base vision tower) or an adapter with vision weights."""
        if adapter is None or self.slots is None or adapter not in self.slots.vision:
            return None
        return (adapter, self._loads[adapter])

    def _image_outputs(self, inputs: Any, requests: Sequence[GenerationRequest]) -> dict[str, Any] | None:
        """The vision tower's features for every image of the batch, as the model's ``mm_encoder_outputs``.

        Images of rows whose adapter has vision-tower weights run with that adapter's slot on their
        patches (so such adapters share a batch); features of an image with an ``image_key`` are kept
        (:attr:`feature_cache_size` images) and reused by the next row that shows the same image to the
        same vision tower: a routed request's classification and generation run the tower once.
        """
        if "pixel_values" not in inputs:
            return None
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        grid = inputs["image_grid_thw"]
        patches = grid.prod(-1).tolist()
        starts = [0, *itertools.accumulate(patches)]
        owners = [r for r in requests for _ in r.images]  # one entry per image, in order
        per_row: Counter[int] = Counter()
        keys: list[tuple[Any, ...] | None] = []
        for r in owners:
            j = per_row[id(r)]
            per_row[id(r)] += 1
            keys.append(
                None if r.image_key is None else (r.image_key, j, r.bounds, self._vision_identity(r.adapter))
            )
        found = {i: self._features[k] for i, k in enumerate(keys) if k is not None and k in self._features}
        todo = [i for i in range(len(owners)) if i not in found]
        if todo:
            pv = torch.cat([inputs["pixel_values"][starts[i] : starts[i + 1]] for i in todo])
            adapters = [owners[i].adapter if self._vision_identity(owners[i].adapter) else None for i in todo]
            rows: Any = contextlib.nullcontext()
            if self.slots is not None and any(adapters):
                rows = self.slots.rows(adapters, tokens=[patches[i] for i in todo])
            with rows:
                out = self._vlm().get_image_features(pv, grid[todo], return_dict=True)
            self.vision_images += len(todo)
            for n, i in enumerate(todo):
                found[i] = (out.pooler_output[n], [layer[n] for layer in out.deepstack_features])
                key = keys[i]
                if key is not None:
                    self._features[key] = found[i]
                    self._features.move_to_end(key)
            while len(self._features) > self.feature_cache_size:
                self._features.popitem(last=False)
        for k in keys:
            if k is not None and k in self._features:
                self._features.move_to_end(k)
        order = [found[i] for i in range(len(owners))]
        layers = len(order[0][1])
        features: Any = {  # per-image tuples, the shape get_image_features returns
            "pooler_output": tuple(f[0] for f in order),
            "deepstack_features": [tuple(f[1][layer] for f in order) for layer in range(layers)],
        }
        return {"image": BaseModelOutputWithDeepstackFeatures(**features)}

    def check_adapters(self, adapters: Sequence[str | None]) -> None:
        loaded = set(self.adapters)
        missing = sorted({a for a in adapters if a is not None and a not in loaded})
        if missing:
            raise EngineError(f"adapters {missing} are not loaded (loaded: {sorted(loaded)})")

    @torch.inference_mode()
    def prefill(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, KVBatch]:
        """Read the rows' prompts in one forward: their next-token logits ``[rows, vocab]`` (fp32) and
        their attention state, ready for :meth:`decode` (alone or joined to a running batch)."""
        with self._lock:
            self.check_adapters([r.adapter for r in requests])
            inputs = self._encode_requests(requests)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            types = inputs.get("mm_token_type_ids")
            if types is None:
                types = torch.zeros_like(ids)
            positions, _ = self._vlm().get_rope_index(
                ids, types, inputs.get("image_grid_thw"), attention_mask=mask
            )
            with self.adapter_context([r.adapter for r in requests]) as kwargs:
                encoded = self._image_outputs(inputs, requests)
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    mm_encoder_outputs=encoded,
                    use_cache=True,
                    logits_to_keep=1,
                    **kwargs,
                )
            self.forwards += 1
        batch = KVBatch(
            out.cache,
            mask,
            positions.amax(dim=(0, 2)) + 1,
            [r.adapter for r in requests],
            mask.sum(-1).tolist(),
        )
        return out.logits[:, -1].float(), batch

    @torch.inference_mode()
    def decode(self, batch: KVBatch, tokens: Sequence[int]) -> torch.Tensor:
        """One decode step: feed each row its last token; the next-token logits ``[rows, vocab]`` (fp32)."""
        rows = len(batch)
        ids = torch.tensor(tokens, device=self.device).view(rows, 1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(rows, 1)], dim=1)
        position_ids = batch.positions.view(1, rows, 1).expand(3, rows, 1)
        with self._lock, self.adapter_context(batch.adapters) as kwargs:
            out = self.model(
                input_ids=ids,
                attention_mask=batch.mask,
                position_ids=position_ids,
                cache=batch.cache,
                use_cache=True,
                **kwargs,
            )
            self.forwards += 1
        batch.cache = out.cache
        batch.positions = batch.positions + 1
        return out.logits[:, -1].float()

    # ------------------------------------------------------------- generation
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        exact_tokens: int | None = None,
        sampling: Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Run all requests as one batch (prefill, then decode steps until every row ends); rows may
        name different adapters and sampling settings (default greedy, up to ``max_new_tokens``).

        ``exact_tokens`` makes every row generate that many tokens, end of sequence or not (benchmarks).
        """
        from moe_core.scheduler import run_batch

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

    def image_tokens(self, image: Image.Image, bounds: PixelBounds | None = None) -> int:
        """What ``image`` costs in the prompt at ``bounds`` (default the engine's), from its size alone."""
        return vision.plan(
            image.width, image.height, bounds or self.bounds, self.settings.image_factor
        ).tokens

    @torch.inference_mode()
    def generate_hf(
        self, requests: Sequence[GenerationRequest], *, exact_tokens: int | None = None
    ) -> list[GenerationResult]:
        """The whole batch in one Hugging Face ``generate`` call (greedy): the reference the step
        loop is tested against, and the old whole-batch path the benchmark compares with. Adapters
        with vision-tower weights are refused here (``generate`` runs the tower without the slots).
        """
        if not requests:
            return []
        if self.slots is not None and any(r.adapter in self.slots.vision for r in requests):
            raise EngineError("adapters with vision-tower weights need generate(), not generate_hf()")
        t0 = time.perf_counter()
        max_new = exact_tokens or max(r.max_new_tokens or self.max_new_tokens for r in requests)
        fixed = {"min_new_tokens": exact_tokens} if exact_tokens else {}
        with self._lock, self.adapter_context([r.adapter for r in requests]) as kwargs:
            inputs = self._encode_requests(requests)
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
            inputs = self._encode_requests(requests)
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
