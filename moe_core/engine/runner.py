"""The model runner: one packed forward of the language model over the paged KV cache.

A step is a list of :class:`RowWork`: each row's new tokens (one for a decoding row, a chunk for a row
being read), where they sit in the row's sequence, their M-RoPE positions and the row's block table.
The runner packs them into one sequence (decoding rows first), builds the embeddings with each image
token's vision features (run through the vision tower once per image and identity, or taken from the
row's own or the shared feature cache), adds the deepstack features in the first layers, writes every
new token's keys and values into its page, and returns next-token logits for the rows that asked.
Each row's adapter applies to its own tokens (LoRA slots); the LM head runs on the asked rows only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_core.engine.attention import PagedStep, Segment, forward_step, register, slot_index
from moe_core.engine.graphs import DecodeGraphs, StepMode
from moe_core.engine.kv import KVCache
from moe_core.engine.lora import LoraSlots
from moe_core.engine.prompts import Prompt, PromptImage
from moe_core.engine.vision_cache import FeatureCache, Features

__all__ = ["ModelRunner", "RowWork"]


@dataclass(eq=False)
class RowWork:
    """One row's share of a step."""

    adapter: str | None
    decode: bool  # a decoding row (its last token); else a chunk of its prompt (or of a resumed row)
    ids: list[int]  # the tokens fed now
    start: int  # their first index in the row's sequence (tokens before it are cached)
    positions: torch.Tensor | None  # [3, len(ids)]; None for a decoding row (``position`` on all 3 axes)
    pages: list[int]  # the row's block table, covering start + len(ids) tokens
    logits: bool  # next-token logits wanted (a decoding row, or the last chunk of a prompt)
    prompt: Prompt | None = None  # for the images of a prompt chunk
    vision: str | None = None  # the vision tower's identity for this row (None: the base tower)
    features: dict[str, Features] = field(default_factory=dict)  # the row's images' features, kept
    position: int = 0  # a decoding row's M-RoPE position (text: the same on every axis)


class ModelRunner:
    """Forwards of one model over a :class:`~moe_core.engine.kv.KVCache`. Call with the engine's lock."""

    def __init__(
        self,
        model: Any,
        kv: KVCache,
        features: FeatureCache,
        adapter_context: Callable[[Sequence[str | None]], contextlib.AbstractContextManager[Any]],
        slots: Callable[[], LoraSlots | None],
        pixels: Callable[[Sequence[PromptImage]], None],
    ) -> None:
        self.model = model
        self.kv = kv
        self.features = features
        self._adapter_context = adapter_context
        self._slots = slots
        self._pixels = pixels
        register(self._top(model))
        self.forwards = 0  # steps run (a PEFT engine mixing adapters runs a step as one forward per adapter)
        self.vision_images = 0  # images run through the vision tower
        self.fail_hook: Callable[[Sequence[RowWork]], None] | None = None  # tests: simulate a fault
        self.graphs: DecodeGraphs | None = None  # decode-only steps, padded and static (engine.step)

    def set_step(self, mode: StepMode) -> None:
        """How decode-only steps run from now on (:mod:`moe_core.engine.graphs`)."""
        self.graphs = (
            None
            if mode == "eager"
            else DecodeGraphs(
                mode,
                self.kv,
                lambda: self._vlm().language_model,
                lambda: self._top(self.model).lm_head,
                self._slots,
            )
        )

    @staticmethod
    def _top(model: Any) -> Any:
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _vlm(self) -> Any:
        return self._top(self.model).model

    # ----------------------------------------------------------------- vision
    def image_features(self, images: Sequence[PromptImage], adapters: Sequence[str | None]) -> list[Features]:
        """The vision tower's features of ``images``, image ``i`` seen through ``adapters[i]``'s tower
        (None: the base tower); one tower call for all."""
        self._pixels(images)  # the patches of those not made yet, in one call
        pv = torch.cat([im.patches[0] for im in images]).to(self.kv.layout.device)
        grid = torch.tensor([im.grid_thw for im in images], device=pv.device)
        slots = self._slots()
        rows: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if slots is not None and any(a is not None for a in adapters):
            patches = [int(t * h * w) for t, h, w in (im.grid_thw for im in images)]
            rows = slots.rows(adapters, tokens=patches, vision=True)
        with rows:
            out = self._vlm().get_image_features(pv, grid, return_dict=True)
        self.vision_images += len(images)
        return [
            (out.pooler_output[n], tuple(layer[n] for layer in out.deepstack_features))
            for n in range(len(images))
        ]

    def _row_features(self, rows: Sequence[RowWork]) -> None:
        """Fill each row's ``features`` for the images its chunk covers (cache first, then one tower call)."""
        todo: dict[tuple[str, str | None], tuple[PromptImage, str | None, list[RowWork]]] = {}
        for row in rows:
            if row.prompt is None:
                continue
            end = row.start + len(row.ids)
            for im in row.prompt.images:
                if im.key in row.features or im.start >= end or im.start + im.tokens <= row.start:
                    continue
                key = (im.key, row.vision)
                found = self.features.get(key)
                if found is not None:
                    row.features[im.key] = found
                else:
                    todo.setdefault(key, (im, row.vision, []))[2].append(row)
        if not todo:
            return
        entries = list(todo.values())
        # a vision identity other than the base tower's is its adapter's: any of its rows names it
        computed = self.image_features(
            [im for im, _, _ in entries], [None if v is None else rs[0].adapter for _, v, rs in entries]
        )
        for (key, (im, _, owners)), feats in zip(todo.items(), computed, strict=True):
            self.features.put(key, feats)
            for row in owners:
                row.features[im.key] = feats

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, rows: Sequence[RowWork]) -> torch.Tensor:
        """Run one step; next-token logits ``[rows asking, vocab]`` (fp32), in row order."""
        if self.fail_hook is not None:
            self.fail_hook(rows)
        self.forwards += 1
        slots = self._slots()
        adapters = {r.adapter for r in rows}
        if (
            self.graphs is not None
            and self.graphs.handles(rows)
            and (slots is not None or (adapters == {None} and not hasattr(self.model, "peft_config")))
        ):
            return self.graphs.run(rows)
        self._row_features(rows)
        if slots is None and len(adapters) > 1:  # PEFT's layers take one adapter a forward: by groups
            out: list[tuple[int, torch.Tensor]] = []
            order = sorted(range(len(rows)), key=lambda i: (rows[i].adapter or "", i))
            groups: dict[str | None, list[int]] = {}
            for i in order:
                groups.setdefault(rows[i].adapter, []).append(i)
            for members in groups.values():
                logits = self._forward([rows[i] for i in members])
                asked = [i for i in members if rows[i].logits]
                out += list(zip(asked, logits, strict=True))
            out.sort(key=lambda x: x[0])
            return torch.stack([t for _, t in out]) if out else torch.empty(0)
        return self._forward(rows)

    def _forward(self, rows: Sequence[RowWork]) -> torch.Tensor:
        kv = self.kv
        p = kv.layout.page_tokens
        device = kv.layout.device
        decode = [r for r in rows if r.decode]
        chunks = [r for r in rows if not r.decode]
        packed = decode + chunks  # decoding rows first: one batched attention for them
        ids: list[int] = []
        write: list[int] = []
        segments: list[Segment] = []
        for r in packed:
            if not r.decode:
                context = slot_index(r.pages, 0, r.start, p)
                mine = slot_index(r.pages, r.start, len(r.ids), p)
                segments.append(
                    Segment(len(ids), len(r.ids), r.start, torch.tensor(context + mine, device=device))
                )
            else:
                mine = slot_index(r.pages, r.start, 1, p)
            ids += r.ids
            write += mine
        step = PagedStep(
            kv,
            torch.tensor(write, device=device),
            [r.pages for r in decode],
            [r.start + 1 for r in decode],
            segments,
        )
        parts = [torch.tensor([r.position for r in decode]).expand(3, -1)] if decode else []
        parts += [r.positions for r in chunks if r.positions is not None]
        positions = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(device)  # [3, tokens]
        tokens = torch.tensor(ids, device=device)
        vlm = self._vlm()
        lm = vlm.language_model
        visual_at: list[int] = []
        visual: list[torch.Tensor] = []
        deep: list[list[torch.Tensor]] = []
        offset = 0
        for r in packed:
            if r.prompt is not None:
                end = r.start + len(r.ids)
                for im in r.prompt.images:
                    lo, hi = max(im.start, r.start), min(im.start + im.tokens, end)
                    if lo >= hi:
                        continue
                    pooled, stack = r.features[im.key]
                    visual_at += range(offset + lo - r.start, offset + hi - r.start)
                    visual.append(pooled[lo - im.start : hi - im.start])
                    deep.append([layer[lo - im.start : hi - im.start] for layer in stack])
            offset += len(r.ids)
        adapters = [r.adapter for r in packed]
        with self._adapter_context_for(adapters, [len(r.ids) for r in packed]):
            embeds = lm.embed_tokens(tokens)  # [tokens, hidden]
            kwargs: dict[str, Any] = {}
            if visual:
                at = torch.tensor(visual_at, device=device)
                embeds = embeds.index_copy(0, at, torch.cat(visual).to(embeds.dtype))
                mask = torch.zeros(len(ids), dtype=torch.bool, device=device)
                mask[at] = True
                kwargs["visual_pos_masks"] = mask[None]
                kwargs["deepstack_visual_embeds"] = [
                    torch.cat([d[layer] for d in deep]) for layer in range(len(deep[0]))
                ]
            hidden = forward_step(lm, embeds, positions, step, **kwargs)  # [tokens, hidden]
        ends: list[int] = []
        asked: list[RowWork] = []
        offset = 0
        for r in packed:
            offset += len(r.ids)
            if r.logits:
                ends.append(offset - 1)
                asked.append(r)
        if not asked:
            return torch.empty(0, device=device)
        last = hidden[torch.tensor(ends, device=device)][:, None, :]  # [rows, 1, hidden]
        with self._adapter_context_for([r.adapter for r in asked], None):
            logits = self._top(self.model).lm_head(last)[:, 0].float()
        order = {id(r): k for k, r in enumerate(asked)}
        return logits[[order[id(r)] for r in rows if r.logits]]

    @contextlib.contextmanager
    def _adapter_context_for(self, adapters: list[str | None], tokens: list[int] | None) -> Iterator[None]:
        slots = self._slots()
        if slots is not None:
            with slots.rows(adapters, tokens=tokens):
                yield
            return
        with self._adapter_context(adapters):
            yield
