"""The static-shape decode step: eager, compiled with ``torch.compile``, or captured as CUDA graphs.

A step in which every row decodes one token is the engine's hot loop. Here it is one function of
fixed-shape tensors: the rows are padded to a batch-size bucket (1, 2, 4, 8, 16, 32) and the block
tables to a power-of-two number of pages, and everything that varies with the batch (tokens,
M-RoPE positions, where each row writes its keys and values, its block table and length, its LoRA
slot) is an input tensor. Nothing inside branches on data or copies to the host, so the step can be
compiled (inductor, on the CPU) or captured once per bucket as a CUDA graph and replayed, which
removes the per-operation launch cost that bounds an eager decode step of a large model.

Padding rows are inert: they feed token 0 at position 0, write their keys and values into the KV
cache's scratch page (never allocated to a request, never read by one), attend to that page alone,
read the null LoRA slot, and their logits are dropped. Rows of prompt chunks, and batches past the
largest bucket, take the runner's variable-shape path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from moe_core.engine.attention import forward_step
from moe_core.engine.kv import KVCache
from moe_core.engine.lora import LoraSlots, SlotBatch, SlotError

if TYPE_CHECKING:
    from moe_core.engine.runner import RowWork

__all__ = ["BUCKETS", "DecodeGraphs", "StepMode", "bucket"]

logger = logging.getLogger(__name__)

#: Batch sizes a decode step is padded to (vLLM's and SGLang's capture sizes start the same way).
BUCKETS = (1, 2, 4, 8, 16, 32)
#: How a decode step runs: ``eager`` (the runner's variable-shape path), ``static`` (the padded step, eager:
#: the reference for the other two), ``compile`` (the padded step through ``torch.compile``),
#: ``cuda_graphs`` (the padded step captured per bucket on CUDA).
StepMode = Literal["eager", "static", "compile", "cuda_graphs"]


def bucket(n: int, sizes: Sequence[int] = BUCKETS) -> int | None:
    """The smallest size in ``sizes`` holding ``n`` rows; None past the largest."""
    return next((b for b in sizes if b >= n), None)


def _pages_bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DecodeAttention:
    """The attention layout of a padded decode step, built from tensors only (graph-safe).

    The model receives it as its ``cache`` (:meth:`update` writes each row's new keys and values in
    place) and as ``moe_step`` (:meth:`attend`: each row attends to its own pages, masked to its length).
    """

    def __init__(self, kv: KVCache, write: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor) -> None:
        p = kv.layout.page_tokens
        self.kv = kv
        self.write_slots = write  # [rows]
        self.rows, self.width = table.shape[0], table.shape[1] * p
        j = torch.arange(self.width, device=table.device)
        self.index = (table[:, j // p] * p + j % p).reshape(-1)  # [rows * width] slots of each row's pages
        self.mask = (j[None, :] < lengths[:, None])[:, None, None, :]  # [rows, 1, 1, width]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv.flat(layer_idx)
        # index_put_, not index_copy_: inductor writes it in place in the cache (no copy of the cache)
        k[self.write_slots] = key_states[0].transpose(0, 1).to(k.dtype)
        v[self.write_slots] = value_states[0].transpose(0, 1).to(v.dtype)
        return key_states, value_states

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        keys, values = self.kv.flat(layer)
        heads, dim = keys.shape[1], keys.shape[2]
        q = query[0].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, head_dim]
        k = keys.index_select(0, self.index).view(self.rows, self.width, heads, dim).transpose(1, 2)
        v = values.index_select(0, self.index).view(self.rows, self.width, heads, dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scaling, enable_gqa=True)
        return o[:, :, 0].unsqueeze(0)  # [1, rows, heads, head_dim]


@dataclass
class _Inputs:
    """One bucket's input tensors, views of one buffer filled by one copy a step (static for a CUDA
    graph), and, once captured, its graph."""

    data: torch.Tensor  # [7 * rows + rows * pages]: tokens, positions (3 rows), write, lengths, slots, table
    rows: int
    pages: int
    lora: SlotBatch | None
    graph: Any = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # the graph's output buffer

    def part(self, k: int, n: int = 1) -> torch.Tensor:
        return self.data[k * self.rows : (k + n) * self.rows]

    @property
    def tokens(self) -> torch.Tensor:
        return self.part(0)

    @property
    def positions(self) -> torch.Tensor:
        return self.part(1, 3).view(3, self.rows)

    @property
    def write(self) -> torch.Tensor:
        return self.part(4)

    @property
    def lengths(self) -> torch.Tensor:
        return self.part(5)

    @property
    def slots(self) -> torch.Tensor:
        return self.part(6)

    @property
    def table(self) -> torch.Tensor:
        return self.data[7 * self.rows :].view(self.rows, self.pages)


class DecodeGraphs:
    """Runs decode-only steps as the padded static step, in ``mode``; counts what it ran."""

    def __init__(
        self,
        mode: StepMode,
        kv: KVCache,
        lm: Callable[[], Any],
        lm_head: Callable[[], Any],
        slots: Callable[[], LoraSlots | None],
    ) -> None:
        if mode == "cuda_graphs" and kv.layout.device.type != "cuda":
            raise ValueError("engine.step cuda_graphs needs a CUDA device; use compile or eager on the CPU")
        self.mode = mode
        self.kv = kv
        self._lm, self._lm_head, self._slots = lm, lm_head, slots
        self._inputs: dict[tuple[int, int, bool], _Inputs] = {}
        self._step: Callable[..., torch.Tensor] = self._forward
        if mode == "compile":
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._step = torch.compile(self._forward, dynamic=False, fullgraph=True)
        self.steps = 0  # decode steps run here
        self.padded_rows = 0  # padding rows run (and dropped)
        self.captures = 0  # CUDA graphs captured
        self._pool: Any = None

    def handles(self, rows: Sequence[RowWork]) -> bool:
        """Whether ``rows`` is a step this path runs: decoding rows only, at most the largest bucket."""
        return bool(rows) and len(rows) <= BUCKETS[-1] and all(r.decode for r in rows)

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        write: torch.Tensor,
        table: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        step = DecodeAttention(self.kv, write, table, lengths)
        lm = self._lm()
        hidden = forward_step(lm, lm.embed_tokens(tokens), positions, step)  # [rows, hidden]
        logits: torch.Tensor = self._lm_head()(hidden[:, None, :])[:, 0].float()
        return logits

    def _buffers(self, n: int, pages: int, lora: bool) -> _Inputs:
        rows = bucket(n)
        assert rows is not None
        key = (rows, _pages_bucket(pages), lora)
        found = self._inputs.get(key)
        if found is None:
            data = torch.zeros(7 * rows + rows * key[1], dtype=torch.long, device=self.kv.layout.device)
            found = _Inputs(data, rows, key[1], None)
            slots = self._slots()
            if lora and slots is not None:
                found.lora = SlotBatch(rows, index=found.slots)
            self._inputs[key] = found
        return found

    def run(self, rows: Sequence[RowWork]) -> torch.Tensor:
        """Next-token logits ``[rows, vocab]`` (fp32) of a decode-only step, in row order."""
        p = self.kv.layout.page_tokens
        slots = self._slots()
        lora = slots is not None and any(r.adapter is not None for r in rows)
        buf = self._buffers(len(rows), max(len(r.pages) for r in rows), lora)
        pad = buf.rows - len(rows)
        scratch = self.kv.scratch
        null = 0
        index: list[int] = []
        if slots is not None:
            null = slots.null
            named = [slots.slot_of(r.adapter) if r.adapter is not None else null for r in rows]
            missing = sorted({r.adapter for r, i in zip(rows, named, strict=True) if i is None and r.adapter})
            if missing:
                raise SlotError(f"adapters {missing} are not loaded")
            index = [null if i is None else i for i in named]
        positions = [r.position for r in rows] + [0] * pad
        values = (  # every input of the step, in one host list and one copy to the device
            [r.ids[0] for r in rows]
            + [0] * pad
            + positions * 3
            + [r.pages[r.start // p] * p + r.start % p for r in rows]
            + [scratch * p] * pad
            + [r.start + 1 for r in rows]
            + [1] * pad
            + (index + [null] * pad if index else [0] * buf.rows)
        )
        for r in rows:
            values += r.pages
            values += [scratch] * (buf.pages - len(r.pages))
        values += [scratch] * (buf.pages * pad)
        buf.data.copy_(torch.tensor(values), non_blocking=True)
        self.steps += 1
        self.padded_rows += pad
        self.kv.bytes_written += len(rows) * self.kv.layout.bytes_per_token
        logits = self._replay(buf) if self.mode == "cuda_graphs" else self._call(buf)
        return logits[: len(rows)]

    def _call(self, buf: _Inputs) -> torch.Tensor:
        slots = self._slots()
        if slots is not None:
            slots.batch = buf.lora
        try:
            return self._step(buf.tokens, buf.positions, buf.write, buf.table, buf.lengths)
        finally:
            if slots is not None:
                slots.batch = None

    def _replay(self, buf: _Inputs) -> torch.Tensor:
        if buf.graph is None:  # warm up on a side stream, then capture this bucket once
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # (writes the rows' keys and values, as the replay will again)
                        self._call(buf)
                torch.cuda.current_stream().wait_stream(stream)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    buf.logits = self._call(buf)
            except Exception:  # never fail a request for a capture: run the same step eagerly from now on
                logger.exception(
                    "CUDA graph capture of a decode step of %d rows failed; running it eagerly", buf.rows
                )
                self.mode = "static"
                return self._call(buf)
            buf.graph = graph
            self.captures += 1
        buf.graph.replay()
        assert buf.logits is not None
        return buf.logits.clone()
