"""An LRU of LoRA adapters resident in one engine, fed from shared storage.

One in-flight load per adapter, blocking I/O off the event loop, a log line with the load time,
unload safe to run twice, and a new published version picked up without a restart (the ``CURRENT``
pointer is re-read at most every ``refresh_interval_s`` per adapter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from moe_core.storage.errors import StorageError, StorageUnavailable
from moe_core.storage.layout import Kind

__all__ = ["AdapterCache", "AdapterEngine", "AdapterNotFound", "AdapterStore", "CacheBusy", "CacheEvents"]

logger = logging.getLogger(__name__)


class AdapterNotFound(LookupError):
    """No usable version of the adapter: none published, a broken pointer, or it failed to load."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class CacheBusy(RuntimeError):
    """Every LoRA slot serves running requests: a new adapter cannot be loaded now (a 503)."""


class AdapterEngine(Protocol):
    def load_adapter(self, name: str, path: str | Path) -> None: ...
    def unload_adapter(self, name: str) -> None: ...


class CacheEvents(Protocol):
    """Where the cache reports loads, evictions and failures (the deployment's metrics)."""

    def loaded(self, adapter: str, seconds: float, resident: int) -> None: ...
    def evicted(self, adapter: str, resident: int) -> None: ...
    def failed(self, adapter: str) -> None: ...


class AdapterStore(Protocol):
    def current_version(self, kind: Kind, name: str) -> str | None: ...
    def fetch(self, kind: Kind, name: str, version: str | None = None) -> tuple[Path, str]: ...
    def check_reachable(self) -> None: ...
    def release(self, kind: Kind, name: str) -> None:
        """This process no longer uses what it fetched of ``name`` (the node cache may evict it)."""


@dataclass
class _Entry:
    version: str
    checked_at: float
    loaded_at: float


class AdapterCache:
    def __init__(
        self,
        engine: AdapterEngine,
        store: AdapterStore,
        capacity: int,
        refresh_interval_s: float,
        *,
        wait_s: float,
        kind: Kind = "expert",
        events: CacheEvents | None = None,
        busy: Callable[[], set[str]] | None = None,
    ) -> None:  # a constructor's shape, like the runner's and deploy_adapter's: not a repeated block
        self.engine = engine
        self.store = store
        self.capacity = capacity
        self.refresh_interval_s = refresh_interval_s
        self.kind = kind
        self.events = events
        self.busy = busy or set  # adapters with queued or running rows: never evicted or reloaded under them
        self.wait_s = wait_s  # how long a load waits for a LoRA slot to free up before it gives up
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._reserved: set[str] = set()  # new adapters whose load runs: they hold a LoRA slot already
        self._pinned: Counter[str] = Counter()  # adapters an ensure() in progress returns to its caller
        self.loads = 0
        self.evictions = 0

    @property
    def resident(self) -> dict[str, str]:
        """Adapter name -> resident version, least recently used first."""
        return {n: e.version for n, e in self._entries.items()}

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._evict(keep=())

    async def ensure(self, names: Iterable[str]) -> dict[str, str]:
        """Make every adapter in ``names`` resident at its current version; returns their versions."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.capacity:
            raise ValueError(f"{len(wanted)} adapters requested at once, cache holds {self.capacity}")
        self._pinned.update(wanted)  # no other request evicts them before this one has used them
        try:
            for name in wanted:
                await self._ensure_one(name, keep=wanted)
                while name not in self._entries:  # evicted while this request awaited (it was not pinned yet)
                    await self._ensure_one(name, keep=wanted)
                self._entries.move_to_end(name)
            self._evict(keep=wanted)
            return {n: self._entries[n].version for n in wanted}
        finally:
            self._pinned.subtract(wanted)
            self._pinned += Counter()  # drop the zero counts

    async def _ensure_one(self, name: str, keep: Iterable[str] = ()) -> None:
        while (fut := self._inflight.get(name)) is not None:  # one in-flight load per adapter
            await asyncio.shield(fut)
        entry = self._entries.get(name)
        now = time.monotonic()
        if entry is not None and now - entry.checked_at < self.refresh_interval_s:
            return
        fut = asyncio.get_running_loop().create_future()
        self._inflight[name] = fut
        try:
            try:
                current = await asyncio.to_thread(self._current_version, name)
            except StorageUnavailable as e:
                if entry is None:
                    raise  # nothing to serve it with: a 503 that names the storage
                # an outage is not a new version: the loaded one keeps answering until storage is back
                entry.checked_at = now
                logger.warning("adapter %s: %s; still serving %s", name, e, entry.version)
                current = entry.version
            except StorageError as e:  # a broken pointer fails this adapter's rows, not the batch
                raise AdapterNotFound(name, f"adapter {name!r} has no usable version: {e}") from e
            if current is None:
                raise AdapterNotFound(name, f"adapter {name!r} has no published version in storage")
            if entry is not None and entry.version == current:
                entry.checked_at = now
            elif entry is not None and name in self.busy():
                pass  # rows decode with the loaded version: the new one is loaded once they are done
            else:
                if entry is None:  # make room first: the LoRA slots never hold more than the capacity
                    await self._make_room(name, keep)
                try:
                    await asyncio.to_thread(self._load, name, current)
                except (
                    Exception
                ) as e:  # files or tensors the engine refuses: this adapter's rows fail, not the batch
                    if self.events is not None:
                        self.events.failed(name)
                    if entry is None:
                        raise AdapterNotFound(
                            name, f"adapter {name!r} version {current} failed to load: {e}"
                        ) from e
                    # the engine refuses before it touches the loaded version: keep serving that one
                    entry.checked_at = now
                    logger.error(
                        "adapter %s: version %s failed to load (%s); still serving %s",
                        name,
                        current,
                        e,
                        entry.version,
                    )
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-check and retry on their own
            raise
        finally:
            del self._inflight[name]
            self._reserved.discard(name)

    def _current_version(self, name: str) -> str | None:
        """The published version; raises StorageUnavailable when the storage, not the name, is missing."""
        current = self.store.current_version(self.kind, name)
        if current is None:
            self.store.check_reachable()
        return current

    def _load(self, name: str, version: str) -> None:
        t0 = time.perf_counter()
        path, _ = self.store.fetch(self.kind, name, version)
        self.engine.load_adapter(name, path)  # replaces an older version of the same name
        now = time.monotonic()
        old = self._entries.get(name)
        self._entries[name] = _Entry(version, now, now)
        self.loads += 1
        if self.events is not None:
            self.events.loaded(name, time.perf_counter() - t0, len(self._entries))
        logger.info(
            "adapter %s: loaded version %s%s in %.3fs",
            name,
            version,
            f" (was {old.version})" if old else "",
            time.perf_counter() - t0,
        )

    async def _make_room(self, name: str, keep: Iterable[str]) -> None:
        """Evict until one more adapter fits; while every resident adapter has running rows, wait."""
        deadline = time.monotonic() + self.wait_s
        while True:
            self._evict(keep=keep, room=1)
            if len(self._entries) + len(self._reserved) < self.capacity:
                self._reserved.add(name)  # held while the load runs: concurrent loads never overfill
                return
            if time.monotonic() > deadline:
                raise CacheBusy(
                    f"adapter {name!r}: all {self.capacity} adapter slots serve running requests; retry later"
                )
            await asyncio.sleep(0.005)

    def _evict(self, keep: Iterable[str], room: int = 0) -> None:
        """Evict least recently used entries not in ``keep`` (nor busy) until ``room`` more fit."""
        keep = set(keep) | self.busy() | set(self._pinned)
        while len(self._entries) + len(self._reserved) + room > self.capacity:
            victim = next((n for n in self._entries if n not in keep), None)
            if victim is None:
                return
            del self._entries[victim]
            self.engine.unload_adapter(victim)
            self._release(victim)
            self.evictions += 1
            if self.events is not None:
                self.events.evicted(victim, len(self._entries))
            logger.info("adapter %s: evicted (LRU, capacity %d)", victim, self.capacity)

    def forget(self, name: str) -> None:
        """Unload ``name`` now (idempotent)."""
        if self._entries.pop(name, None) is not None:
            self.engine.unload_adapter(name)
            self._release(name)

    def _release(self, name: str) -> None:
        """The version of ``name`` this process fetched is no longer used: the node cache may evict it
        (a store without leases, a test's fake, has nothing to release)."""
        release = getattr(self.store, "release", None)
        if release is not None:
            release(self.kind, name)
