"""The prompt builder: chat template, text spliced in as text, image plan, token counting, positions.

Two outputs. :meth:`PromptBuilder.build` turns one request into a :class:`Prompt` for the paged engine
(token ids, M-RoPE positions, each image's patches, its place in the prompt and its content identity);
it runs on the caller's thread with its own processor copy, outside the engine's lock, so template
rendering, tokenization and image resizing never hold up a decode step. :meth:`PromptBuilder.encode`
gives the padded batches of Hugging Face's own forward (training, the reference paths).

The chat template is rendered with :data:`TEXT_PLACEHOLDER` for every text part and each text is tokenized
on its own, as text: a special-token string in a user's text (``<|im_start|>``) is never a control
token, and ordinary text gets exactly the ids it would get inline (the template ends at special tokens
on both sides of a text part). An assistant's tool calls (name and arguments) are spliced in the same way;
the tools themselves render through the template as JSON, and a special-token string in them is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from moe_core import vision
from moe_core.engine.request import ChatProcessor, EngineError, GenerationRequest, InvalidInput, Turn
from moe_core.vision import PixelBounds

__all__ = ["TEMPLATE_CACHE_SIZE", "TEXT_PLACEHOLDER", "Prompt", "PromptBuilder", "PromptImage"]

#: Where the user's text goes in the rendered chat template; a special token no processor expands.
TEXT_PLACEHOLDER = "<|vision_pad|>"
#: Clients' own system prompts whose chat template length is kept (besides the engine's own).
TEMPLATE_CACHE_SIZE = 64

#: (input_ids [1, L], mm_token_type_ids [1, L], image_grid_thw [n, 3] or None) -> positions [3, 1, L]
RopeIndex = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True, eq=False)
class PromptImage:
    """One image of a prompt: what it shows, its grid, and where its tokens sit. Its patches are made
    only when its features are needed (:meth:`PromptBuilder.pixels`): an image the feature cache or the
    prefix cache already covers (an agent's earlier screenshots) is never resized or patched again."""

    key: str  # content identity: a hash of the pixels as sent, their size and the pixel bounds
    source: Image.Image  # as sent
    bounds: PixelBounds
    grid_thw: tuple[int, int, int]
    start: int  # index of its first image token in the prompt
    tokens: int  # its image tokens (patches / merge^2)
    patches: list[torch.Tensor] = field(default_factory=list, repr=False)  # [patches, patch_dim], once made


@dataclass(frozen=True)
class Prompt:
    """A request as the engine runs it: every prompt token, its M-RoPE position, and its images."""

    ids: tuple[int, ...]
    positions: torch.Tensor  # [3, L] (temporal, height, width), long, on the CPU
    next_position: int  # position of the first generated token (on all three axes)
    images: tuple[PromptImage, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, index: int) -> int | None:
        """The (text) position of token ``index`` past the prompt; None inside the prompt."""
        return None if index < len(self.ids) else self.next_position + index - len(self.ids)


class PromptBuilder:
    """Everything between a request and the model's token ids, for one model's processor."""

    def __init__(
        self,
        processor: ChatProcessor,
        system_prompt: str,
        bounds: PixelBounds,
        patch_size: int,
        image_factor: int,
        rope_index: RopeIndex | None = None,
    ) -> None:
        self.processor = processor  # the engine's: encode() runs on the thread that holds the engine
        self.system_prompt = system_prompt
        self.bounds, self.patch_size, self.image_factor = bounds, patch_size, image_factor
        self.rope_index = rope_index
        # A Rust tokenizer used from two threads at once fails ("Already borrowed"): counting and
        # building have their own copies, each behind its own lock, apart from the engine's
        self._counting = copy.deepcopy(processor.tokenizer)
        self._count_lock = threading.Lock()
        self._building: Any = copy.deepcopy(processor)
        self._build_lock = threading.Lock()
        # chat template length by system prompt: the engine's own, and the last few a client sent
        self._template_tokens: OrderedDict[str, int] = OrderedDict()
        self._template_length(system_prompt)  # counted now: the first request's check never waits
        tok = processor.tokenizer
        self.image_token_id = int(tok.convert_tokens_to_ids("<|image_pad|>"))
        self._placeholder_id = int(tok.convert_tokens_to_ids(TEXT_PLACEHOLDER))
        decoder = getattr(tok, "added_tokens_decoder", {})
        self._specials = sorted({t.content for t in decoder.values() if getattr(t, "special", False)})

    # ------------------------------------------------------------ templates
    @staticmethod
    def template_messages(turns: Sequence[Turn[Image.Image]]) -> tuple[list[dict[str, Any]], list[str]]:
        """The chat template's messages with every text part as :data:`TEXT_PLACEHOLDER` (and the texts, in order)."""
        messages, texts = [], []
        for turn in turns:
            content: list[dict[str, Any]] = []
            for part in turn.parts:
                if isinstance(part, str) and turn.inline:
                    content.append({"type": "text", "text": part})
                elif isinstance(part, str):
                    texts.append(part)
                    content.append({"type": "text", "text": TEXT_PLACEHOLDER})
                else:
                    content.append({"type": "image", "image": part})
            message: dict[str, Any] = {"role": turn.role, "content": content}
            if turn.tool_calls:  # the template writes name and arguments after the content: spliced as text
                message["tool_calls"] = [
                    {
                        "type": "function",
                        "function": {"name": TEXT_PLACEHOLDER, "arguments": TEXT_PLACEHOLDER},
                    }
                    for _ in turn.tool_calls
                ]
                texts += [x for call in turn.tool_calls for x in call]
            messages.append(message)
        return messages, texts

    def tools(self, tools: str | None) -> list[Any] | None:
        """The request's tools for the chat template; a special-token string in them is refused (they
        render as template text, where it would be a control token)."""
        if not tools:
            return None
        found = [t for t in self._specials if t in tools]
        if found:
            raise InvalidInput("tools", f"the tool definitions hold special-token text {found[:3]}")
        parsed: list[Any] = json.loads(tools)
        return parsed

    @staticmethod
    def _plain_messages(image: Image.Image | None, prompt: str, system: str) -> list[dict[str, Any]]:
        turns = GenerationRequest(image, prompt).conversation(system)
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

    def image_tokens(self, image: Image.Image, bounds: PixelBounds | None = None) -> int:
        """What ``image`` costs in the prompt at ``bounds`` (default the engine's), from its size alone."""
        return vision.plan(image.width, image.height, bounds or self.bounds, self.image_factor).tokens

    # ------------------------------------------------------------- counting
    def prompt_tokens(
        self,
        prompt: str,
        image_tokens: int,
        system_prompt: str | None = None,
        turns: Sequence[Turn[Image.Image]] = (),
        tools: str | None = None,
    ) -> int:
        """Tokens of the chat prompt for ``prompt`` (or the conversation ``turns``, with ``tools``) with images of
        ``image_tokens`` tokens in all, counted without the images' pixels (the processor expands each
        image placeholder to its tokens). Raises ``UnicodeEncodeError`` for text that is not valid
        unicode (a lone surrogate). Safe from any thread."""
        system = self.system_prompt if system_prompt is None else system_prompt
        with self._count_lock:
            if turns:
                conversation = GenerationRequest(None, "", turns=tuple(turns)).conversation(system)
                messages, texts = self.template_messages(conversation)
                rendered = self.processor.apply_chat_template(
                    messages, tools=self.tools(tools), add_generation_prompt=True, tokenize=False
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
                counted = self._template_length(system)
            else:
                self._template_tokens.move_to_end(system)
            prompt.encode("utf-8")  # a lone surrogate fails here, with the reason
            ids = self._counting(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return counted - 2 + len(ids) + image_tokens  # the prompt and image placeholders replaced

    def _template_length(self, system: str) -> int:
        """Tokens of the chat template around one prompt and one image placeholder (cached per system prompt)."""
        messages = self._plain_messages(Image.new("RGB", (1, 1)), TEXT_PLACEHOLDER, system)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        n = self._template_tokens[system] = len(self._counting(text)["input_ids"])
        while len(self._template_tokens) > TEMPLATE_CACHE_SIZE + 1:  # clients' prompts vary: bounded
            oldest = next(k for k in self._template_tokens if k != self.system_prompt)
            del self._template_tokens[oldest]
        return n

    # ------------------------------------------------------------- building
    def build(self, request: GenerationRequest) -> Prompt:
        """The request's prompt for the paged engine. Raises ``UnicodeEncodeError`` for invalid text.

        The processor's own steps, for one row, without touching pixels: the template rendered with one
        ``<|image_pad|>`` per image, tokenized once; each text placeholder replaced by its text's ids;
        each image placeholder expanded to its image tokens, its grid planned from its size alone
        (:func:`moe_core.vision.plan`, what the resize will give). Patches come later, if needed."""
        if self.rope_index is None:
            raise EngineError("this prompt builder has no position function (build needs the model's)")
        bounds = request.bounds or self.bounds
        sources = request.images
        messages, parts = self.template_messages(request.conversation(self.system_prompt))
        tools = self.tools(request.tools)
        with self._build_lock:
            proc = self._building
            text = proc.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
            template = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
            texts = [self._prompt_ids(proc, t) for t in parts]
        ids: list[int] = []
        images: list[PromptImage] = []
        merge = self.image_factor // self.patch_size
        k_text = 0
        for token in template:
            if token == self._placeholder_id:
                ids += texts[k_text]
                k_text += 1
            elif token == self.image_token_id:
                if len(images) == len(sources):
                    raise EngineError("more image placeholders than images")
                im = sources[len(images)]
                plan = vision.plan(im.width, im.height, bounds, self.image_factor)
                grid = (1, plan.model_height // self.patch_size, plan.model_width // self.patch_size)
                key = hashlib.blake2b(im.tobytes(), digest_size=16)
                key.update(
                    f"{im.mode}{im.size}{bounds.min_pixels},{bounds.max_pixels},{self.patch_size}".encode()
                )
                n = grid[0] * grid[1] * grid[2] // merge**2
                images.append(PromptImage(key.hexdigest(), im, bounds, grid, len(ids), n))
                ids += [self.image_token_id] * n
            else:
                ids.append(token)
        if k_text != len(texts) or len(images) != len(sources):
            raise EngineError(
                f"{k_text} text and {len(images)} image placeholders for {len(texts)} texts and "
                f"{len(sources)} images"
            )
        row = torch.tensor([ids])
        types = (row == self.image_token_id).int()
        grid_thw = torch.tensor([im.grid_thw for im in images]) if images else None
        positions = self.rope_index(row, types, grid_thw)[:, 0]  # [3, L]
        return Prompt(tuple(ids), positions, int(positions.max()) + 1 if ids else 0, tuple(images))

    def pixels(self, image: PromptImage) -> torch.Tensor:
        """The image's patches ``[patches, patch_dim]`` (resized as Qwen does, then patched), made once."""
        self.make_pixels([image])
        return image.patches[0]

    def make_pixels(self, images: Sequence[PromptImage]) -> None:
        """Make the patches of those of ``images`` that have none yet, in one image-processor call."""
        todo = list({id(im): im for im in images if not im.patches}.values())
        if not todo:
            return
        ready = [self.prepare_image(im.source, im.bounds) for im in todo]
        with self._build_lock:
            out = self._building.image_processor(images=ready, do_resize=False, return_tensors="pt")
        offset = 0
        for im, grid in zip(todo, out["image_grid_thw"].tolist(), strict=True):
            if tuple(grid) != im.grid_thw:
                raise EngineError(f"image planned as grid {im.grid_thw} was patched as {tuple(grid)}")
            n = grid[0] * grid[1] * grid[2]
            im.patches.append(out["pixel_values"][offset : offset + n])
            offset += n

    # -------------------------------------------------------- padded batches
    def _prompt_ids(self, processor: Any, prompt: str) -> list[int]:
        """The user's text as text: a special-token string in it is never a control token."""
        prompt.encode("utf-8")  # a lone surrogate fails here, before the processor
        ids: list[int] = processor.tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]
        return ids

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
        """Tokenize chat prompts with images (a padded batch); with ``answers``, append them as the
        assistant turn. Row ``i`` is ``images[i]`` and ``prompts[i]`` after the system prompt, or the
        conversation ``turns[i]`` when given and not empty. Each image is resized by
        :meth:`prepare_image` (within its row's ``bounds``, default the engine's) and reaches the
        processor with resizing off: qwen-vl-utils is the one resizer. Uses the engine's processor:
        call it from the thread that holds the engine."""
        per_row = bounds if bounds is not None else [None] * len(prompts)
        rows = [
            GenerationRequest(im, p, turns=tuple(turns[i]) if turns is not None else ())
            for i, (im, p) in enumerate(zip(images, prompts, strict=True))
        ]
        ready = [self.prepare_image(im, b) for row, b in zip(rows, per_row, strict=True) for im in row.images]
        return self._encode(self.processor, rows, ready, answers, padding_side, system=system_prompt)

    def _encode(
        self,
        processor: Any,
        rows: Sequence[GenerationRequest],
        ready: list[Image.Image],
        answers: Sequence[str] | None,
        padding_side: str,
        *,
        system: str | None,
    ) -> Any:
        system = self.system_prompt if system is None else system
        texts: list[str] = []
        text_ids: list[list[list[int]]] = []
        for i, row in enumerate(rows):
            messages, parts = self.template_messages(row.conversation(system))
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            texts.append(text if answers is None else text + answers[i])
            text_ids.append([self._prompt_ids(processor, t) for t in parts])
        processor.tokenizer.padding_side = padding_side
        try:
            batch = processor(
                text=texts, images=ready or None, padding=True, do_resize=False, return_tensors="pt"
            )
        finally:
            processor.tokenizer.padding_side = "left"
        return self._splice(processor, batch, text_ids, padding_side)

    @staticmethod
    def _splice(processor: Any, batch: Any, text_ids: Sequence[list[list[int]]], padding_side: str) -> Any:
        """Put each row's text tokens where the template has its placeholders, and pad the rows again."""
        tok = processor.tokenizer
        placeholder = tok.convert_tokens_to_ids(TEXT_PLACEHOLDER)
        rows: dict[str, list[torch.Tensor]] = {"input_ids": [], "mm_token_type_ids": []}
        keys = [k for k in rows if k in batch]
        for i, parts in enumerate(text_ids):
            real = batch["attention_mask"][i].bool()
            seq = batch["input_ids"][i][real]
            (where,) = (seq == placeholder).nonzero(as_tuple=True)
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
