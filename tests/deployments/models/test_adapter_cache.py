"""The LRU over a real storage root, with a recording engine (the cache logic, not the model)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from deployments.models.adapter_cache import AdapterCache, AdapterNotFound, CacheBusy
from moe_core.config import StorageConfig
from moe_core.node_cache.files import content_key
from moe_core.storage.store import Storage


class RecordingEngine:
    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []

    def load_adapter(self, name: str, path: str | Path) -> None:
        self.loaded[name] = (Path(path) / "tag").read_text()
        self.events.append(("load", name))

    def unload_adapter(self, name: str) -> None:
        self.loaded.pop(name, None)
        self.events.append(("unload", name))


def _publish(st: Storage, tmp: Path, name: str, tag: str) -> str:
    d = tmp / f"{name}-{tag}"
    d.mkdir()
    (d / "tag").write_text(tag)
    return st.publish("expert", name, d)


def test_lru_eviction_single_flight_and_new_versions(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "s"))
    for n in ("a", "b", "c"):
        _publish(st, tmp_path, n, "v1")
    eng = RecordingEngine()
    cache = AdapterCache(eng, st, capacity=2, refresh_interval_s=0.0, wait_s=30.0)

    async def scenario() -> None:
        await asyncio.gather(*(cache.ensure(["a"]) for _ in range(5)))  # one load for five callers
        assert eng.events == [("load", "a")]
        await cache.ensure(["b"])
        await cache.ensure(["c"])  # evicts a (least recently used)
        assert set(eng.loaded) == {"b", "c"} and ("unload", "a") in eng.events
        _publish(st, tmp_path, "b", "v2")
        await cache.ensure(["b"])  # picked up without a restart
        assert eng.loaded["b"] == "v2"
        with pytest.raises(AdapterNotFound):
            await cache.ensure(["nope"])
        with pytest.raises(ValueError, match="cache holds 2"):
            await cache.ensure(["a", "b", "c"])
        cache.resize(1)
        assert len(eng.loaded) == 1
        cache.forget("b")
        cache.forget("b")  # idempotent

    asyncio.run(scenario())


def test_adapters_with_running_rows_are_never_evicted_or_reloaded(tmp_path: Path) -> None:
    """With continuous batching a load runs while other rows decode: it must not take their slots."""
    st = Storage(str(tmp_path / "s"))
    for n in ("a", "b", "c"):
        _publish(st, tmp_path, n, "v1")
    eng = RecordingEngine()
    running: set[str] = set()
    cache = AdapterCache(eng, st, capacity=2, refresh_interval_s=0.0, busy=lambda: set(running), wait_s=0.5)

    async def scenario() -> None:
        await cache.ensure(["a"])
        await cache.ensure(["b"])
        running.update({"a", "b"})
        with pytest.raises(CacheBusy, match="all 2 adapter slots"):
            await cache.ensure(["c"])  # waits for a slot, then gives up: a and b stay loaded
        assert set(eng.loaded) == {"a", "b"}
        _publish(st, tmp_path, "a", "v2")
        await cache.ensure(["a"])  # a new version waits until a's rows are done
        assert eng.loaded["a"] == "v1"
        loading = asyncio.create_task(cache.ensure(["c"]))
        await asyncio.sleep(0.05)
        running.discard("b")  # b's rows finished: c takes its slot
        await loading
        assert set(eng.loaded) == {"a", "c"}
        running.clear()
        await cache.ensure(["a"])
        assert eng.loaded["a"] == "v2"

    asyncio.run(scenario())


def test_concurrent_loads_of_new_adapters_never_overfill_the_slots(tmp_path: Path) -> None:
    """Found by the soak: two new adapters loading at once each saw one free slot and both loaded."""
    st = Storage(str(tmp_path / "s"))
    names = [f"a{i}" for i in range(6)]
    for n in names:
        _publish(st, tmp_path, n, "v1")

    class SlotEngine(RecordingEngine):
        def load_adapter(self, name: str, path: str | Path) -> None:
            time.sleep(0.02)  # a load takes time: other requests arrive meanwhile
            if name not in self.loaded and len(self.loaded) >= 2:
                raise ValueError(f"adapter {name!r}: all 2 slots are taken; unload one first")
            super().load_adapter(name, path)

    eng = SlotEngine()
    cache = AdapterCache(eng, st, capacity=2, refresh_interval_s=60.0, wait_s=30.0)

    async def scenario() -> None:
        await asyncio.gather(*(cache.ensure([n]) for n in names * 3))

    asyncio.run(scenario())
    assert len(eng.loaded) <= 2


def test_evicted_and_forgotten_adapters_release_their_version_in_the_node_cache(tmp_path: Path) -> None:
    """A remote root (memory://, through the node cache, bounded at one byte): an adapter the LRU evicts
    or forgets releases its lease, so the node cache can evict its version; one still loaded keeps it."""
    st = Storage.from_config(
        StorageConfig(
            url=f"memory://leases-{uuid.uuid4().hex}", cache_dir=str(tmp_path / "node"), cache_max_gb=1e-9
        )
    )
    for n, tag in (("a", "one"), ("b", "two")):
        _publish(st, tmp_path, n, tag)
    versions = tmp_path / "node" / "versions"
    key = {
        n: content_key(st.manifest("expert", n, st.current_version("expert", n) or "")["files"]) for n in "ab"
    }
    eng = RecordingEngine()
    cache = AdapterCache(eng, st, capacity=1, refresh_interval_s=0.0, wait_s=30.0)

    async def scenario() -> None:
        await cache.ensure(["a"])
        assert {p.name for p in versions.iterdir()} == {key["a"]}  # in use: kept over the bound
        await cache.ensure(["b"])  # a is evicted from the engine, then from the node
        assert {p.name for p in versions.iterdir()} == {key["b"]}
        cache.forget("b")
        st.node_cache.evict()
        assert not any(versions.iterdir())

    asyncio.run(scenario())
