"""The slotted linear layer: a base ``nn.Linear`` plus stacked LoRA slots, applied per row.

Every targeted linear holds the adapters in pre-allocated slots (``A: [slots, r, in]``,
``B: [slots, out, r]``, zero-padded to the maximum rank, the adapter's scaling folded into ``B``). A
forward takes the slots its rows use (gathered once per batch composition and kept while it lasts),
concatenates them into one ``[in, k*r]`` shrink and one ``[k*r, out]`` expand, and masks each row (or
token) to its own slot's ``r`` columns between the two: two dense matmuls per layer whatever the
number of adapters in the batch; rows of the bare base model get exact zeros. Which rows use which slot
is the owning :class:`~moe_core.engine.lora.slots.LoraSlots`' current :class:`SlotBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from moe_core.engine.lora.slots import LoraSlots

__all__ = ["SlotBatch", "SlottedLinear"]


@dataclass
class SlotBatch:
    """One batch composition's slot use, shared by every slotted layer (computed once per composition)."""

    active: torch.Tensor  # [k] slot ids used by some row
    mask: torch.Tensor | None  # [rows, 1, k*rank] or [tokens, k*rank]: 1 on the row's own slot's columns
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # per layer


class SlottedLinear(nn.Module):
    """A linear layer plus LoRA slots; rows pick their slot through the owning slot manager."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, owner: LoraSlots) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        self.rank = rank
        self.lora_A = nn.Parameter(
            torch.zeros(slots, rank, base.in_features, dtype=w.dtype, device=w.device), False
        )
        self.lora_B = nn.Parameter(
            torch.zeros(slots, base.out_features, rank, dtype=w.dtype, device=w.device), False
        )
        self._owner = [owner]  # a list: not registered as a submodule
        self.vision = False  # a vision-tower layer: its rows are image patches (LoraSlots.vision_batch)

    def resize(self, slots: int, keep: torch.Tensor) -> None:
        """``slots`` slots from now on, the first ``len(keep)`` holding the old slots ``keep``."""
        for attr in ("lora_A", "lora_B"):
            old: torch.Tensor = getattr(self, attr)
            new = torch.zeros(slots, *old.shape[1:], dtype=old.dtype, device=old.device)
            new[: keep.numel()] = old.index_select(0, keep.to(old.device))
            setattr(self, attr, nn.Parameter(new, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        owner = self._owner[0]
        batch = owner.vision_batch if self.vision else owner.batch
        if batch is None:
            return y
        ab = batch.weights.get(id(self))
        if ab is None:  # the batch's slots side by side, gathered once per composition
            k = batch.active.numel()
            a = self.lora_A.index_select(0, batch.active).reshape(k * self.rank, -1)  # [k*r, in]
            b = self.lora_B.index_select(0, batch.active).permute(1, 0, 2).reshape(-1, k * self.rank)
            ab = batch.weights[id(self)] = (a.T.contiguous(), b.T.contiguous())  # [in, k*r], [k*r, out]
        shrunk = x.to(ab[0].dtype) @ ab[0]  # [..., k*r]
        if batch.mask is not None:  # rows of several adapters (or the base): keep each row's own slot
            shrunk = shrunk * batch.mask
        return y + (shrunk @ ab[1]).to(y.dtype)
