"""The KV memory manager: a pool of fixed-size pages allocated up front, block tables, prefix sharing.

Keys and values of every layer live in one preallocated tensor pair of ``pages`` pages of
``page_tokens`` tokens each (:class:`KVCache`); a request owns a list of pages (its block table) and a
length, and its tokens are written in place at ``page * page_tokens + offset``. Nothing is padded or
concatenated: a row joining or leaving the running batch costs a few page ids, whatever the others
hold. Page 0 is the null page, never allocated and always zero: block tables are padded with it, so a
padded read sees zeros, never a freed page's stale values.

:class:`PageAllocator` hands out pages and takes them back. With prefix caching on, a full page is
registered under a hash chain over everything that decided its contents (the model and adapter
identity, the vision identity, every token id and each image's content hash with its offset): a later
request whose prefix hashes the same shares the page (reference counted) instead of computing it
again. Unreferenced registered pages stay cached until the pool needs them (least recently used
first). A page computed under one adapter version can never match a request under another: the
identity is part of the first hash.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVCache", "KVLayout", "OutOfPages", "PageAllocator", "chain_hashes"]


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for."""


@dataclass(frozen=True)
class KVLayout:
    """The shape of one token's keys and values in every layer, and the page size."""

    layers: int
    kv_heads: int
    head_dim: int
    page_tokens: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, text_config: Any, page_tokens: int, dtype: torch.dtype, device: torch.device) -> KVLayout:
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        return cls(
            text_config.num_hidden_layers,
            text_config.num_key_value_heads,
            head_dim,
            page_tokens,
            dtype,
            device,
        )

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.page_tokens

    def pages_for(self, budget_bytes: int) -> int:
        """Usable pages in ``budget_bytes`` (the null and scratch pages are on top)."""
        return max(0, budget_bytes // self.bytes_per_page - 2)


class KVCache:
    """Keys and values of every layer, one tensor per layer and kind: ``[(pages + 2) * page_tokens,
    kv_heads, head_dim]`` (slot = page * page_tokens + offset).

    Page 0 is the null page (zeros: what masked padding reads), pages ``1 .. pages`` are the pool, and
    the last is the scratch page, where the padding rows of a static decode step write and read. Each
    layer's tensor is its own allocation, not a view of a shared one, so a compiled step writes it in
    place (a write through a view makes ``torch.compile`` copy the whole base)."""

    def __init__(self, layout: KVLayout, pages: int) -> None:
        if pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {pages}")
        self.layout, self.pages = layout, pages
        self.scratch = pages + 1  # never allocated, never read by a request
        shape = ((pages + 2) * layout.page_tokens, layout.kv_heads, layout.head_dim)
        self.k = [torch.zeros(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.layers)]
        self.v = [torch.zeros(shape, dtype=layout.dtype, device=layout.device) for _ in range(layout.layers)]
        self.bytes_written = 0  # KV bytes written since start (a proxy for memory traffic, tested)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def page(self, layer: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values of page ``page``: ``[page_tokens, kv_heads, head_dim]`` views."""
        p = self.layout.page_tokens
        return self.k[layer][page * p : (page + 1) * p], self.v[layer][page * p : (page + 1) * p]

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values as ``[slots, kv_heads, head_dim]`` (slot = page * P + offset)."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys``/``values`` ``[tokens, kv_heads, head_dim]`` at ``slots`` ``[tokens]``, in place."""
        k, v = self.flat(layer)
        k.index_copy_(0, slots, keys.to(k.dtype))
        v.index_copy_(0, slots, values.to(v.dtype))
        self.bytes_written += 2 * keys.numel() * k.element_size()


def chain_hashes(
    previous: bytes,
    tokens: Sequence[int],
    images: Sequence[tuple[str, int, int]],
    page_tokens: int,
    first_page: int,
    pages: int,
) -> list[bytes]:
    """Hashes of pages ``first_page .. pages - 1`` of ``tokens``, each chained on the one before
    (``previous``: the hash of page ``first_page - 1``, or the root identity for page 0).

    ``images`` are ``(content key, first token, tokens)``: a page holding part of an image hashes the
    image's key and where the image starts relative to the page, so the same image-token ids of two
    different screenshots never match."""
    out: list[bytes] = []
    for page in range(first_page, pages):
        lo, hi = page * page_tokens, (page + 1) * page_tokens
        h = hashlib.blake2b(previous, digest_size=16)
        h.update(struct.pack(f"<{hi - lo}q", *tokens[lo:hi]))
        for key, start, n in images:
            if start < hi and start + n > lo:
                h.update(f"|{key}@{start - lo}".encode())
        previous = h.digest()
        out.append(previous)
    return out


class PageAllocator:
    """Free pages, reference counts, and the prefix table of registered full pages."""

    def __init__(self, pages: int, *, prefix_caching: bool = True) -> None:
        self.pages = pages
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, pages + 1))  # page 0 is the null page
        self._refs = [0] * (pages + 1)
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced: LRU first
        self.hits = 0  # pages found in the prefix table
        self.evictions = 0  # registered pages reused for something else

    @property
    def available(self) -> int:
        """Pages an allocation may take now (free, or cached and unreferenced)."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Pages referenced by some request."""
        return self.pages - self.available

    @property
    def cached(self) -> int:
        """Registered pages (referenced or not)."""
        return len(self._hash_of)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """``n`` pages, each with one reference; free pages first, then the least recently used cached
        ones. Raises :class:`OutOfPages` (taking nothing) when fewer are available."""
        if n > self.available:
            raise OutOfPages(f"{n} pages asked for, {self.available} available of {self.pages}")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._idle.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.evictions += 1
            self._refs[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; a page nobody holds is free again (or cached, if registered)."""
        for page in pages:
            self._refs[page] -= 1
            assert self._refs[page] >= 0, f"page {page} released twice"
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The registered pages of the longest prefix of ``hashes``, each with a new reference."""
        if not self.prefix_caching:
            return []
        out = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
            out.append(page)
        self.hits += len(out)
        return out

    def register(self, page: int, h: bytes) -> None:
        """Record that full page ``page`` holds what ``h`` hashes (kept if another page has it already)."""
        if self.prefix_caching and h not in self._page_of and page not in self._hash_of:
            self._page_of[h] = page
            self._hash_of[page] = h

    def forget(self, pages: Sequence[int]) -> None:
        """Unregister ``pages`` (their contents are not to be shared: a row that failed wrote them)."""
        for page in pages:
            h = self._hash_of.pop(page, None)
            if h is not None:
                del self._page_of[h]
                if page in self._idle:
                    del self._idle[page]
                    self._free.append(page)

    def clear_cache(self) -> None:
        """Forget every registered page (an engine's weights changed)."""
        self.forget(list(self._hash_of))
