"""Many LoRA adapters applied in one pass: stacked per-layer slots and one wide low-rank matmul.

PEFT applies a mixed batch by looping over the adapters in every LoRA layer (and masking rows), so a
batch of 8 adapters costs 8 small matmul pairs per layer plus Python dispatch. Here, as in S-LoRA and
Punica, every targeted linear holds the adapters in pre-allocated slots (``A: [slots, r, in]``,
``B: [slots, out, r]``, zero-padded to the configured maximum rank, with the adapter's scaling folded
into ``B``). A forward takes the slots its rows use (``index_select``, once per layer), concatenates
them into one ``[in, k*r]`` shrink and one ``[k*r, out]`` expand, and masks each row to its own slot's
``r`` columns between the two: two dense matmuls per layer, whatever the number of adapters in the
batch (the gathered weights are kept for the batch's decode steps; a batch of one adapter skips the
mask; rows of the bare base model get exact zeros). The per-row slot index is set once per batch
(:meth:`LoraSlots.rows`) and read by every layer; a Triton/CUDA BGMV/SGMV kernel can replace
:meth:`SlottedLinear.forward` without changing anything else.

PEFT stays the format: adapters are PEFT folders (``adapter_config.json`` + safetensors), read here.
Loading an adapter copies its tensors into a free slot; no module is re-wrapped per load.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoraSlots", "SlotError", "SlottedLinear"]

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


class SlotError(ValueError):
    """An adapter the slots cannot hold; the message names the adapter and the reason."""


@dataclass
class _Batch:
    """The current batch's slot use, shared by every slotted layer (computed once per batch)."""

    active: torch.Tensor  # [k] slot ids used by some row
    mask: torch.Tensor | None  # [batch, 1, k*rank] (or [tokens, k*rank]): 1 on the row's own slot's columns
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # per layer, per batch


class SlottedLinear(nn.Module):
    """A linear layer plus LoRA slots; rows pick their slot through the owning :class:`LoraSlots`."""

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
        if ab is None:  # the batch's slots side by side, gathered once per batch (prefill), reused per step
            k = batch.active.numel()
            a = self.lora_A.index_select(0, batch.active).reshape(k * self.rank, -1)  # [k*r, in]
            b = self.lora_B.index_select(0, batch.active).permute(1, 0, 2).reshape(-1, k * self.rank)
            ab = batch.weights[id(self)] = (a.T.contiguous(), b.T.contiguous())  # [in, k*r], [k*r, out]
        shrunk = x.to(ab[0].dtype) @ ab[0]  # [batch, L, k*r]
        if batch.mask is not None:  # rows of several adapters (or the base): keep each row's own slot
            shrunk = shrunk * batch.mask
        return y + (shrunk @ ab[1]).to(y.dtype)


class LoraSlots:
    """LoRA slots on every linear of ``model`` whose name matches ``targets``; slot ``n`` holds one adapter."""

    def __init__(self, model: nn.Module, targets: str, slots: int, max_rank: int) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError(f"need at least one slot and rank 1, got {slots} slots of rank {max_rank}")
        self.slots, self.max_rank = slots, max_rank
        self.batch: _Batch | None = None  # the language model's rows
        self.vision_batch: _Batch | None = None  # the vision tower's rows (patches of each image)
        self.layers: dict[str, SlottedLinear] = {}
        pattern = re.compile(targets)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and pattern.fullmatch(name):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                slotted = SlottedLinear(module, slots, max_rank, self)
                slotted.vision = ".visual." in f".{name}."
                setattr(parent, child, slotted)
                self.layers[name] = slotted
        if not self.layers:
            raise ValueError(f"no linear layer of the model matches {targets!r}")
        self.names: list[str | None] = [None] * slots  # adapter held by each slot
        self.vision: set[str] = set()  # loaded adapters with weights in the vision tower
        self._generation = 0  # bumped on every change of slot contents: cached batches are stale then
        self._cached: tuple[tuple[int, ...], tuple[int, ...] | None, int, _Batch] | None = None

    # ------------------------------------------------------------------ slots
    def slot_of(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def load(self, name: str, folder: str | Path) -> int:
        """Copy the PEFT adapter in ``folder`` into a slot (its own if loaded, else a free one)."""
        from safetensors.torch import load

        folder = Path(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
        if config.get("use_dora"):
            raise SlotError(f"adapter {name!r}: DoRA adapters cannot share a batch; not loaded")
        if rank > self.max_rank:
            raise SlotError(f"adapter {name!r}: rank {rank} is over the slots' maximum rank {self.max_rank}")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        # parsed from bytes: safetensors' load_file leaks ~2 KB of Python objects per call (its shape
        # ints; measured in the soak), which a replica loading adapters all day cannot afford
        tensors = load((folder / "adapter_model.safetensors").read_bytes())
        for key, t in tensors.items():
            m = _KEY.match(key.removeprefix(_PREFIX))
            if m is None:
                raise SlotError(f"adapter {name!r}: tensor {key} is not a LoRA A/B weight; not loaded")
            pairs.setdefault(m["module"], {})[m["part"]] = t
        unknown = sorted(set(pairs) - set(self.layers))
        if unknown:
            raise SlotError(f"adapter {name!r}: modules {unknown[:3]} are not slotted; not loaded")
        checked: list[tuple[SlottedLinear, torch.Tensor, torch.Tensor]] = []
        for module, ab in pairs.items():  # every pair checked before a slot is touched: never half-loaded
            layer = self.layers[module]
            a, b = ab.get("A"), ab.get("B")
            want_a, want_b = (rank, layer.base.in_features), (layer.base.out_features, rank)
            if a is None or b is None or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise SlotError(
                    f"adapter {name!r}: LoRA pair of {module} does not fit rank {rank}; not loaded"
                )
            checked.append((layer, a, b))
        slot = self.slot_of(name)
        if slot is None:
            if None not in self.names:
                raise SlotError(f"adapter {name!r}: all {self.slots} slots are taken; unload one first")
            slot = self.names.index(None)
        self._clear(slot)
        with torch.no_grad():
            for layer, a, b in checked:
                layer.lora_A[slot, :rank].copy_(a)
                layer.lora_B[slot, :, :rank].copy_(b * scaling)
        self.names[slot] = name
        if any(".visual." in f".{layer_name}." for layer_name in pairs):
            self.vision.add(name)
        else:
            self.vision.discard(name)
        return slot

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (idempotent)."""
        slot = self.slot_of(name)
        if slot is not None:
            self._clear(slot)
            self.names[slot] = None
            self.vision.discard(name)

    def resize(self, slots: int) -> None:
        """Hold ``slots`` adapters from now on; the loaded ones keep their weights (moved to the first slots)."""
        loaded = [(i, n) for i, n in enumerate(self.names) if n is not None]
        if len(loaded) > slots:
            raise SlotError(f"{len(loaded)} adapters are loaded, more than {slots} slots; unload some first")
        keep = torch.tensor([i for i, _ in loaded], dtype=torch.long)
        for layer in self.layers.values():
            layer.resize(slots, keep)
        self.names = [n for _, n in loaded] + [None] * (slots - len(loaded))
        self.slots = slots
        self._generation += 1

    def _clear(self, slot: int) -> None:
        self._generation += 1
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()

    # ---------------------------------------------------------------- batches
    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | None], tokens: Sequence[int] | None = None) -> Iterator[None]:
        """Every forward inside applies row ``i``'s adapter (``None``: the base model) to row ``i``.

        With ``tokens``, the layers see flat ``[tokens, features]`` inputs (the vision tower's patches):
        row ``i`` is the next ``tokens[i]`` of them. The gathered weights are kept while the same rows
        come back (a running batch's decode steps) and the slots' contents do not change.
        """
        missing = sorted({a for a in adapters if a is not None and a not in self.names})
        if missing:
            raise SlotError(f"adapters {missing} are not loaded")
        slots = tuple(self.names.index(a) if a is not None else -1 for a in adapters)
        used = sorted({s for s in slots if s >= 0})
        if not used:
            yield
            return
        key = (slots, tuple(tokens) if tokens is not None else None, self._generation)
        if self._cached is not None and self._cached[:3] == key:
            batch = self._cached[3]
        else:
            batch = self._batch(slots, used, tokens)
            self._cached = (*key, batch)
        attr = "batch" if tokens is None else "vision_batch"
        setattr(self, attr, batch)
        try:
            yield
        finally:
            setattr(self, attr, None)

    def _batch(self, slots: tuple[int, ...], used: list[int], tokens: Sequence[int] | None) -> _Batch:
        first = next(iter(self.layers.values())).lora_A
        mask: torch.Tensor | None = None
        if len(set(slots)) > 1:  # several adapters, or adapters and the base model
            mask = torch.zeros(
                len(slots), 1, len(used) * self.max_rank, device=first.device, dtype=first.dtype
            )
            for i, s in enumerate(slots):
                if s >= 0:
                    j = used.index(s)
                    mask[i, 0, j * self.max_rank : (j + 1) * self.max_rank] = 1.0
            if tokens is not None:  # one mask row per token of each row
                counts = torch.tensor(list(tokens), device=first.device)
                mask = mask[:, 0].repeat_interleave(counts, dim=0)
        return _Batch(torch.tensor(used, device=first.device), mask)
