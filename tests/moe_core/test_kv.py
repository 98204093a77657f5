"""The KV memory manager's bookkeeping: pages, references, the prefix table, hash chains."""

from __future__ import annotations

import pytest
import torch

from moe_core.engine.kv import KVCache, KVLayout, OutOfPages, PageAllocator, chain_hashes


def test_pages_are_reference_counted_and_the_null_page_is_never_handed_out() -> None:
    pool = PageAllocator(4)
    a = pool.allocate(3)
    assert 0 not in a and len(set(a)) == 3 and pool.available == 1
    with pytest.raises(OutOfPages):
        pool.allocate(2)  # takes nothing when it cannot take all
    assert pool.available == 1
    pool.release(a[:1])
    assert pool.available == 2 and pool.used == 2
    with pytest.raises(AssertionError):
        pool.release(a[:1])  # a double release is a bug, not a silent free


def test_registered_pages_are_shared_then_cached_then_evicted_least_recently_used_first() -> None:
    pool = PageAllocator(3)
    h = [bytes([i]) * 16 for i in range(3)]
    p = pool.allocate(2)
    pool.register(p[0], h[0])
    pool.register(p[1], h[1])
    assert pool.match([h[0], h[1], h[2]]) == p  # the longest registered prefix, a reference each
    assert pool.refs(p[0]) == 2
    pool.release(p)
    pool.release(p)  # nobody holds them: cached, still matchable
    assert pool.available == 3 and pool.cached == 2
    assert pool.match([h[0]]) == [p[0]]
    pool.release([p[0]])  # p[0] used last: p[1] is the least recently used
    got = pool.allocate(2)  # the free page first, then the LRU cached page
    assert p[1] in got and p[0] not in got and pool.evictions == 1
    assert pool.match([h[0], h[1]]) == [p[0]]  # h[1] is gone with its page
    pool.release([p[0]])


def test_forgotten_pages_are_never_matched_again_and_a_switched_off_table_never_matches() -> None:
    pool = PageAllocator(2)
    (page,) = pool.allocate(1)
    pool.register(page, b"x" * 16)
    pool.forget([page])
    assert pool.match([b"x" * 16]) == []
    pool.release([page])
    assert pool.cached == 0 and pool.available == 2
    off = PageAllocator(2, prefix_caching=False)
    (page,) = off.allocate(1)
    off.register(page, b"y" * 16)
    assert off.match([b"y" * 16]) == []


def test_hash_chains_depend_on_the_root_every_token_and_each_image_by_content() -> None:
    tokens = list(range(40))
    img = [("screen-a", 4, 12)]  # image tokens 4..15 of page 0 (16 tokens a page)
    base = chain_hashes(b"root", tokens, img, 16, 0, 2)
    assert len(base) == 2 and base == chain_hashes(b"root", tokens, img, 16, 0, 2)
    assert chain_hashes(b"other adapter", tokens, img, 16, 0, 2)[0] != base[0]
    assert (
        chain_hashes(b"root", tokens, [("screen-b", 4, 12)], 16, 0, 2)[0] != base[0]
    )  # same ids, other pixels
    changed = [*tokens[:20], 999, *tokens[21:]]
    got = chain_hashes(b"root", changed, img, 16, 0, 2)
    assert got[0] == base[0] and got[1] != base[1]
    assert chain_hashes(base[0], tokens, img, 16, 1, 2) == base[1:]  # resumable from any page


def test_the_cache_writes_in_place_and_counts_bytes() -> None:
    layout = KVLayout(
        layers=2, kv_heads=2, head_dim=4, page_tokens=4, dtype=torch.float32, device=torch.device("cpu")
    )
    assert layout.bytes_per_token == 2 * 2 * 2 * 4 * 4
    kv = KVCache(layout, pages=3)
    before = kv.k[1].data_ptr()
    kv.write(1, torch.tensor([5, 6]), torch.ones(2, 2, 4), torch.full((2, 2, 4), 2.0))
    k, v = kv.flat(1)
    assert kv.k[1].data_ptr() == before and k[5:7].eq(1).all() and v[5:7].eq(2).all()
    assert k[:5].eq(0).all() and kv.k[0].eq(0).all()
    assert all(kv.page(layer, 0)[0].eq(0).all() for layer in range(2))  # the null page stays zero
    assert kv.bytes_written == 2 * 2 * 2 * 4 * 4
