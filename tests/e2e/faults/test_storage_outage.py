"""Storage made unreadable (a volume unmounted, a bucket out of reach): what a replica holds keeps
answering, what it would have to load is a 503 naming the storage, and it recovers by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from deployments.models.adapter_cache import AdapterCache, AdapterNotFound
from moe_core.config import StorageConfig
from moe_core.storage.errors import StorageUnavailable
from moe_core.storage.store import Storage
from tests.deployments.models.test_adapter_cache import RecordingEngine, _publish
from tests.s3_server import Proxy


def test_an_outage_keeps_loaded_adapters_and_refuses_loads_naming_the_storage(tmp_path: Path) -> None:
    root = tmp_path / "s"
    st = Storage(str(root))
    for n in ("a", "b"):
        _publish(st, tmp_path, n, "v1")
    eng = RecordingEngine()
    cache = AdapterCache(eng, st, capacity=2, refresh_interval_s=0.0, wait_s=30.0)

    async def scenario() -> None:
        await cache.ensure(["a"])
        root.rename(tmp_path / "away")  # the storage goes: every read fails
        assert await cache.ensure(["a"]) == {"a": cache._entries["a"].version}  # still served, no reload
        assert eng.events == [("load", "a")]
        with pytest.raises(StorageUnavailable, match="cannot be read"):
            await cache.ensure(["b"])  # nothing to serve b with: the storage's fault, not b's
        (tmp_path / "away").rename(root)  # back
        await cache.ensure(["b"])
        _publish(st, tmp_path, "a", "v2")
        await cache.ensure(["a"])  # new versions are seen again
        assert eng.loaded == {"a": "v2", "b": "v1"}
        with pytest.raises(AdapterNotFound, match="no published version"):  # a real absence still is one
            await cache.ensure(["nope"])

    asyncio.run(scenario())


def test_an_unreadable_pointer_is_an_outage_not_an_absence(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "s"))
    _publish(st, tmp_path, "a", "v1")
    pointer = Path(st.versions_dir("expert", "a")) / "CURRENT"
    pointer.unlink()
    pointer.mkdir()  # reading it fails with an OSError that is not "no such file"
    with pytest.raises(StorageUnavailable, match="cannot be read"):
        st.current_version("expert", "a")


def test_an_s3_endpoint_gone_is_an_outage_within_seconds(s3_settings: StorageConfig, tmp_path: Path) -> None:
    """The S3 endpoint goes away (the loopback proxy in front of the server stopped, its connections cut):
    readers get StorageUnavailable within seconds, not botocore's EndpointConnectionError after its
    retries (6-19 s), and an adapter cache keeps answering with the adapter it holds."""
    with Proxy(str(s3_settings.endpoint_url)) as proxy:
        st = Storage.from_config(s3_settings.model_copy(update={"endpoint_url": proxy.url}))
        for n in ("a", "b"):
            _publish(st, tmp_path, n, "v1")
        st.write_state("promotion", {"x": 1}, expect=0)
        eng = RecordingEngine()
        cache = AdapterCache(eng, st, capacity=2, refresh_interval_s=0.0, wait_s=30.0)
        resident = asyncio.run(cache.ensure(["a"]))
        proxy.stop()
        for what, call in (
            ("current_version", lambda: st.current_version("expert", "a")),
            ("read_state", lambda: st.read_state("promotion")),
            ("check_reachable", st.check_reachable),
        ):
            t0 = time.perf_counter()
            with pytest.raises(StorageUnavailable, match="cannot be read"):
                call()
            took = time.perf_counter() - t0
            print(f"{what}: StorageUnavailable after {took:.2f} s")
            assert took < 5.0, what

        async def scenario() -> None:
            t0 = time.perf_counter()
            assert await cache.ensure(["a"]) == resident  # still served, no reload
            assert time.perf_counter() - t0 < 5.0
            with pytest.raises(StorageUnavailable):
                await cache.ensure(["b"])  # nothing to serve b with: the storage's fault

        asyncio.run(scenario())
        assert eng.events == [("load", "a")]
