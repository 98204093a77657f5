"""The slotted linear layer: a base ``nn.Linear`` plus stacked LoRA slots, each row reading its own slot.

Every targeted linear holds the adapters in pre-allocated slots (``A: [slots + 1, in, r]``,
``B: [slots + 1, r, out]``, zero-padded to the maximum rank, the adapter's scaling folded into ``B``;
the last slot is the null slot, zeros forever, which the base model's rows read when they share a
batched pass with adapted rows). The layer reads the slots in place through the owning
:class:`~moe_core.engine.lora.slots.LoraSlots`' current :class:`SlotBatch`, which is index metadata
only: a change of batch composition rewrites a few integers, never the weights.

The arithmetic is one interface, :class:`LoraOps`, so that a fused kernel (vLLM's Punica-style
``lora_shrink``/``lora_expand`` in Triton) can replace it on CUDA; :class:`TorchLoraOps` is the
reference, what CPU tests run:

- *gathered* (decode steps, the LM head, Hugging Face's ``[rows, L]`` batches): each row's A and B
  are gathered by its slot index and applied as two batched matmuls, ``bmm`` for the shrink and
  ``baddbmm`` for the expand into the base output: four operations per layer whatever the mix, and
  static shapes (the index is a tensor), so the step can be compiled or captured as a CUDA graph;
- *segments* (prefill chunks and vision patches, rows of unequal length): one ``mm`` + ``addmm_``
  per run of tokens sharing an adapter; tokens of the base model cost nothing.

A row costs the FLOPs of its own adapter (at the slots' rank) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from moe_core.engine.lora.slots import LoraSlots

__all__ = ["LoraOps", "SlotBatch", "SlottedLinear", "TorchLoraOps"]


@dataclass(frozen=True)
class SlotBatch:
    """One batch composition's slot use, shared by every slotted layer: index metadata only.

    ``index`` ``[rows]``: each row's slot (the null slot for the base model's rows), when the layers
    see ``[rows, L, features]`` inputs (or packed single tokens, ``L`` = 1). ``segments``: otherwise,
    the runs of adapted tokens as ``(first token, tokens, slot)`` in a flat run of tokens."""

    rows: int
    index: torch.Tensor | None = None
    segments: tuple[tuple[int, int, int], ...] = ()


class LoraOps(Protocol):
    """Adds each row's LoRA delta to the base output ``y`` of input ``x``, reading stacked slots."""

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: SlotBatch
    ) -> torch.Tensor: ...


class TorchLoraOps:
    """The reference :class:`LoraOps` in plain torch (gathered batched matmuls, or segment matmuls)."""

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: SlotBatch
    ) -> torch.Tensor:
        if x.dtype != a.dtype or y.dtype != a.dtype:  # (slots take the base weight's dtype: not in practice)
            return self.apply(y.to(a.dtype), x.to(a.dtype), a, b, batch).to(y.dtype)
        if batch.index is not None:  # shrink and expand as gathered batched matmuls
            rows = batch.rows
            shrunk = torch.bmm(
                x.reshape(rows, -1, a.shape[1]), a.index_select(0, batch.index)
            )  # [rows, L, r]
            out = torch.baddbmm(y.reshape(rows, -1, b.shape[2]), shrunk, b.index_select(0, batch.index))
            return out.view(y.shape)
        flat_x, flat_y = x.reshape(-1, a.shape[1]), y.view(-1, b.shape[2])
        for start, n, slot in batch.segments:  # one adapter per run of tokens
            flat_y[start : start + n].addmm_(flat_x[start : start + n] @ a[slot], b[slot])
        return y


class SlottedLinear(nn.Module):
    """A linear layer plus LoRA slots; rows pick their slot through the owning slot manager."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, owner: LoraSlots) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        self.rank = rank
        # one more than the slots: the last is the null slot (zeros), read by base rows in a gathered pass
        self.lora_A = nn.Parameter(
            torch.zeros(slots + 1, base.in_features, rank, dtype=w.dtype, device=w.device), False
        )
        self.lora_B = nn.Parameter(
            torch.zeros(slots + 1, rank, base.out_features, dtype=w.dtype, device=w.device), False
        )
        self._owner = [owner]  # a list: not registered as a submodule
        self.vision = False  # a vision-tower layer: its rows are image patches (LoraSlots.vision_batch)

    def resize(self, slots: int, keep: torch.Tensor) -> None:
        """``slots`` slots (plus the null slot) from now on, the first ``len(keep)`` holding the old ``keep``."""
        for attr in ("lora_A", "lora_B"):
            old: torch.Tensor = getattr(self, attr)
            new = torch.zeros(slots + 1, *old.shape[1:], dtype=old.dtype, device=old.device)
            new[: keep.numel()] = old.index_select(0, keep.to(old.device))
            setattr(self, attr, nn.Parameter(new, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        owner = self._owner[0]
        batch = owner.vision_batch if self.vision else owner.batch
        if batch is None:
            return y
        return owner.ops.apply(y, x, self.lora_A, self.lora_B, batch)
