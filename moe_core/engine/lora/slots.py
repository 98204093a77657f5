"""Many LoRA adapters applied in one pass: the slot manager over every slotted layer.

PEFT applies a mixed batch by looping over the adapters in every LoRA layer (and masking rows), so a
batch of 8 adapters costs 8 small matmul pairs per layer plus Python dispatch. Here, as in S-LoRA and
Punica, every targeted linear holds the adapters in pre-allocated slots
(:class:`~moe_core.engine.lora.layer.SlottedLinear`) and reads them in place through index metadata
set once per batch composition (:meth:`LoraSlots.rows`: a slot index per row, or runs of tokens per
adapter for packed prompt chunks and the vision tower's patches), shared by every layer. A row
joining or leaving changes that metadata only; the weights are never gathered per composition.

PEFT stays the format: adapters are PEFT folders (``adapter_config.json`` + safetensors), read here.
Loading is two steps: :func:`parse_adapter` reads and checks the files (no lock needed), and
:meth:`LoraSlots.install` copies the checked tensors into a slot (under the engine's lock). Each loaded
adapter has a content identity (a hash of its config and weights): caches keyed by it never serve one
version's state to another version loaded under the same name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_core.engine.lora.layer import LoraOps, SlotBatch, SlottedLinear, TorchLoraOps

__all__ = ["LoraSlots", "ParsedAdapter", "SlotError", "parse_adapter"]

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")
#: Batch compositions whose index metadata is kept (the packed step and the LM head differ).
_CACHED_BATCHES = 8


class SlotError(ValueError):
    """An adapter the slots cannot hold; the message names the adapter and the reason."""


@dataclass(frozen=True)
class ParsedAdapter:
    """A PEFT LoRA folder read and checked: its A/B pairs by module, rank and scaling, and identity."""

    name: str
    rank: int
    scaling: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])
    identity: str  # sha256 of adapter_config.json and the weights file

    @property
    def vision(self) -> bool:
        return any(".visual." in f".{m}." for m in self.pairs)


def parse_adapter(name: str, folder: str | Path) -> ParsedAdapter:
    """Read the PEFT adapter in ``folder`` (safetensors only). Raises :class:`SlotError` naming what
    the slots cannot serve (DoRA, a lone A or B, a tensor that is not a LoRA weight)."""
    from safetensors.torch import load

    folder = Path(folder)
    raw_config = (folder / "adapter_config.json").read_bytes()
    config = json.loads(raw_config)
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if config.get("use_dora"):
        raise SlotError(f"adapter {name!r}: DoRA adapters cannot share a batch; not loaded")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    # parsed from bytes: safetensors' load_file leaks ~2 KB of Python objects per call (its shape
    # ints; measured in the soak), which a replica loading adapters all day cannot afford
    raw = (folder / "adapter_model.safetensors").read_bytes()
    identity = hashlib.sha256(raw_config + b"\0" + raw).hexdigest()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load(raw).items():
        m = _KEY.match(key.removeprefix(_PREFIX))
        if m is None:
            raise SlotError(f"adapter {name!r}: tensor {key} is not a LoRA A/B weight; not loaded")
        parts.setdefault(m["module"], {})[m["part"]] = t
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in parts.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise SlotError(f"adapter {name!r}: LoRA pair of {module} is missing A or B; not loaded")
        pairs[module] = (a, b)
    return ParsedAdapter(name, rank, scaling, pairs, identity)


class LoraSlots:
    """LoRA slots on every linear of ``model`` whose name matches ``targets``; slot ``n`` holds one adapter."""

    def __init__(self, model: nn.Module, targets: str, slots: int, max_rank: int) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError(f"need at least one slot and rank 1, got {slots} slots of rank {max_rank}")
        self.slots, self.max_rank = slots, max_rank
        self.batch: SlotBatch | None = None  # the language model's rows (or tokens) and the LM head's
        self.vision_batch: SlotBatch | None = None  # the vision tower's rows (patches of each image)
        self.layers: dict[str, SlottedLinear] = {}
        self.ops: LoraOps = TorchLoraOps()  # the arithmetic; a fused kernel may replace it on CUDA
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
        self.identity: dict[str, str] = {}  # loaded adapter -> content identity
        self._cached: OrderedDict[tuple[object, ...], SlotBatch] = OrderedDict()
        self.compositions = 0  # batch compositions whose index metadata was built (weights are not copied)

    @property
    def metadata_bytes(self) -> int:
        """Bytes the kept batch compositions hold (their slot indices; no weights are kept per composition)."""
        return sum(
            b.index.numel() * b.index.element_size() for b in self._cached.values() if b.index is not None
        )

    # ------------------------------------------------------------------ slots
    @property
    def null(self) -> int:
        """The null slot (zeros): what the base model's rows read in a gathered pass."""
        return self.slots

    def slot_of(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def load(self, name: str, folder: str | Path) -> int:
        """Parse the PEFT adapter in ``folder`` and copy it into a slot (its own if loaded, else a free one)."""
        return self.install(parse_adapter(name, folder))

    def install(self, adapter: ParsedAdapter) -> int:
        """Copy a parsed adapter into a slot; every pair is checked before a slot is touched."""
        name, rank = adapter.name, adapter.rank
        if rank > self.max_rank:
            raise SlotError(f"adapter {name!r}: rank {rank} is over the slots' maximum rank {self.max_rank}")
        unknown = sorted(set(adapter.pairs) - set(self.layers))
        if unknown:
            raise SlotError(f"adapter {name!r}: modules {unknown[:3]} are not slotted; not loaded")
        checked: list[tuple[SlottedLinear, torch.Tensor, torch.Tensor]] = []
        for module, (a, b) in adapter.pairs.items():  # never half-loaded
            layer = self.layers[module]
            want_a, want_b = (rank, layer.base.in_features), (layer.base.out_features, rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
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
                layer.lora_A[slot, :, :rank].copy_(a.T)
                layer.lora_B[slot, :rank].copy_(b.T * adapter.scaling)
        self.names[slot] = name
        self.identity[name] = adapter.identity
        if adapter.vision:
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
            self.identity.pop(name, None)

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
        self._cached.clear()  # slot numbers (and the null slot) moved

    def _clear(self, slot: int) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()

    # ---------------------------------------------------------------- batches
    @contextlib.contextmanager
    def rows(
        self, adapters: Sequence[str | None], tokens: Sequence[int] | None = None, *, vision: bool = False
    ) -> Iterator[None]:
        """Every forward inside applies row ``i``'s adapter (``None``: the base model) to row ``i``.

        Without ``tokens`` the layers see ``[rows, L, features]`` inputs. With ``tokens`` they see one
        flat run of tokens (``[1, tokens, features]`` packed rows of the language model, or
        ``[tokens, features]`` patches of the vision tower): row ``i`` is the next ``tokens[i]`` of them.
        ``vision`` applies the rows to the vision tower's layers instead of the language model's and the
        LM head. The index metadata is kept while the same composition comes back (a running batch's
        decode steps); the slots' contents may change under it (an adapter reloaded in place).
        """
        missing = sorted({a for a in adapters if a is not None and a not in self.names})
        if missing:
            raise SlotError(f"adapters {missing} are not loaded")
        slots = tuple(self.names.index(a) if a is not None else -1 for a in adapters)
        used = sorted({s for s in slots if s >= 0})
        if not used:
            yield
            return
        key = (slots, tuple(tokens) if tokens is not None else None)
        batch = self._cached.get(key)
        if batch is None:
            batch = self._cached[key] = self._batch(slots, tokens)
            self.compositions += 1
            while len(self._cached) > _CACHED_BATCHES:
                self._cached.popitem(last=False)
        else:
            self._cached.move_to_end(key)
        attr = "vision_batch" if vision else "batch"
        setattr(self, attr, batch)
        try:
            yield
        finally:
            setattr(self, attr, None)

    def _batch(self, slots: tuple[int, ...], tokens: Sequence[int] | None) -> SlotBatch:
        if tokens is not None and len(set(slots)) == 1:  # one adapter for every token: one plain matmul pair
            return SlotBatch(len(slots), segments=((0, sum(tokens), slots[0]),))
        if tokens is None or all(n == 1 for n in tokens):  # [rows, L] inputs, or packed single tokens
            device = next(iter(self.layers.values())).lora_A.device
            index = torch.tensor([s if s >= 0 else self.null for s in slots], device=device)
            return SlotBatch(len(slots), index=index)
        runs: list[tuple[int, int, int]] = []
        start = 0
        for s, n in zip(slots, tokens, strict=True):
            if s >= 0 and n:
                if runs and runs[-1][2] == s and runs[-1][0] + runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, s)  # the next row of the same adapter
                else:
                    runs.append((start, n, s))
            start += n
        return SlotBatch(len(slots), segments=tuple(runs))
