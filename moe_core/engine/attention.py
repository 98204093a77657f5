"""Attention over the paged KV cache, as a transformers attention function.

A step of the engine is one packed sequence (batch 1): first one token for each decoding row, then the
prefill chunk of each row being read. :class:`PagedStep` carries what attention needs for it (where
each new token's keys and values go, and which slots each row reads); the model receives it as its
``cache`` (its :meth:`PagedStep.update` writes the new keys and values in place) and as the
``moe_step`` keyword that reaches :func:`paged_attention`, registered with transformers'
``AttentionInterface``. Without ``moe_step`` (Hugging Face's own ``generate`` and forward, used for
training and as the reference) the function is plain SDPA.

Decoding rows attend together in one batched SDPA over their gathered slots (block tables padded with
the null page, masked); each prefill chunk attends causally to its row's cached prefix and itself. Only
a row's own, written slots are read: padding reads the null page, which is zero, so no freed page's
stale (or non-finite) values ever reach a softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moe_core.engine.kv import KVCache

__all__ = ["ATTENTION", "NO_MASK", "PagedStep", "Segment", "forward_step", "paged_attention", "register"]

#: The attention implementation's name in transformers' registry.
ATTENTION = "moe_paged"
#: A 4-d attention mask transformers passes through untouched (the paged step masks for itself).
NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def forward_step(
    lm: Any, embeds: torch.Tensor, positions: torch.Tensor, step: Any, **kwargs: Any
) -> torch.Tensor:
    """The language model ``lm`` over one packed step, attending through ``step`` (the model's cache and
    its ``moe_step``: a :class:`PagedStep`, or the decode graphs' own step) instead of a mask; ``kwargs``
    go to the model (the prefill's visual features).
    embeds ``[tokens, hidden]``, positions ``[3, tokens]`` -> hidden ``[tokens, hidden]``."""
    out = lm(
        inputs_embeds=embeds[None],
        position_ids=positions[:, None, :],
        attention_mask=NO_MASK,
        cache=step,
        use_cache=True,
        moe_step=step,
        **kwargs,
    )
    hidden: torch.Tensor = out.last_hidden_state[0]
    return hidden


@dataclass(frozen=True)
class Segment:
    """One prefill chunk: ``length`` query tokens from ``start`` in the packed step, attending to
    ``slots`` (the row's ``context`` cached tokens, then the chunk itself)."""

    start: int
    length: int
    context: int
    slots: torch.Tensor  # [context + length]


def slot_index(pages: Sequence[int], first: int, count: int, page_tokens: int) -> list[int]:
    """Flat cache slots of a row's tokens ``first .. first + count - 1``, from its block table."""
    return [pages[t // page_tokens] * page_tokens + t % page_tokens for t in range(first, first + count)]


class PagedStep:
    """One forward's attention layout over the paged cache."""

    def __init__(
        self,
        kv: KVCache,
        write_slots: torch.Tensor,
        decode_tables: Sequence[Sequence[int]],
        decode_lengths: Sequence[int],
        segments: Sequence[Segment],
    ) -> None:
        self.kv = kv
        self.write_slots = write_slots  # [tokens]
        self.decode_rows = len(decode_tables)
        self.segments = list(segments)
        self.decode_index: torch.Tensor | None = None  # [rows * longest] slots, padding on the null page
        self.decode_mask: torch.Tensor | None = None  # [rows, 1, 1, longest]
        self.longest = 0
        device = kv.layout.device
        p = kv.layout.page_tokens
        if decode_tables:
            self.longest = longest = max(decode_lengths)
            width = -(-longest // p)
            table = torch.tensor([list(t[:width]) + [0] * (width - len(t[:width])) for t in decode_tables])
            j = torch.arange(longest)
            valid = j[None, :] < torch.tensor(list(decode_lengths))[:, None]  # [rows, longest]
            index = (table[:, j // p] * p + j % p).masked_fill_(~valid, 0)
            self.decode_index = index.view(-1).to(device)
            self.decode_mask = valid[:, None, None, :].to(device)
        self.masks = [  # a chunk after cached tokens: causal, shifted by what is cached; else plain causal
            None
            if s.context == 0
            else (torch.arange(s.context + s.length)[None, :] <= s.context + torch.arange(s.length)[:, None])
            .view(1, 1, s.length, -1)
            .to(device)
            for s in segments
        ]

    # the model calls this as its cache: write the step's keys and values in place
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [1, kv_heads, tokens, head_dim] -> [tokens, kv_heads, head_dim]
        self.kv.write(
            layer_idx, self.write_slots, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1)
        )
        return key_states, value_states

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention output ``[1, tokens, heads, head_dim]`` for ``query`` ``[1, heads, tokens, head_dim]``."""
        keys, values = self.kv.flat(layer)  # [slots, kv_heads, head_dim]
        outs: list[torch.Tensor] = []
        n = self.decode_rows
        if n:
            assert self.decode_index is not None
            heads, dim = keys.shape[1], keys.shape[2]
            q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, head_dim]
            k = keys.index_select(0, self.decode_index).view(n, self.longest, heads, dim).transpose(1, 2)
            v = values.index_select(0, self.decode_index).view(n, self.longest, heads, dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.decode_mask, scale=scaling, enable_gqa=True
            )
            outs.append(o[:, :, 0])  # [rows, heads, head_dim]
        for s, mask in zip(self.segments, self.masks, strict=True):
            q = query[:, :, s.start : s.start + s.length]  # [1, heads, length, head_dim]
            k = keys.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx + len, dim]
            v = values.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
            )
            outs.append(o[0].transpose(0, 1))  # [length, heads, head_dim]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    step: PagedStep | None = kwargs.pop("moe_step", None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = getattr(module, "layer_idx", None)
    assert isinstance(layer, int), "paged attention needs the attention module's layer_idx"
    return step.attend(layer, query, scaling), None


def register(model: Any) -> None:
    """Make the language model of ``model`` (a Qwen3-VL) use :func:`paged_attention` (SDPA when not paged)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, paged_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.config.text_config._attn_implementation = ATTENTION
