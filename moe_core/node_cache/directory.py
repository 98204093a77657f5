"""The cache directory: its paths and locks, and what frees space in it (evicting least recently used
versions no process uses, and sweeping what killed processes left in ``tmp/``)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from moe_core.node_cache.files import try_lock

__all__ = ["CacheDirectory"]

#: The package's logger: its records are named ``moe_core.node_cache`` whichever module writes them.
logger = logging.getLogger("moe_core.node_cache")

#: tmp/ entries: ``<key>.<what>-<id>``; the merged code's ``<key>-<id>``, ``blob-...`` and ``evict-...`` too
_TMP_RE = re.compile(r"(?P<key>[0-9a-f]{64})[.-](?:(?P<what>build|blob|aside|evict)-)?")
#: a tmp/ entry that names no version (``blob-...`` of the merged code) is swept once this old
_ORPHAN_TMP_S = 3600.0


class CacheDirectory:
    """A node cache's directory (:class:`moe_core.node_cache.cache.NodeCache` takes versions into it)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        streams: int = 8,
        part_bytes: int = 16 << 20,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.streams = max(1, streams)
        self.part_bytes = max(1, part_bytes)
        #: what this process did: versions served from the node ("hits"), built ("fills"), files and
        #: bytes downloaded, files found corrupt and fetched again ("repairs"), versions evicted
        self.stats: Counter[str] = Counter()
        self._swept = False  # tmp/ swept once when this process starts taking versions

    def __repr__(self) -> str:
        return f"NodeCache({str(self.root)!r})"

    def _tmp(self, key: str, what: str) -> Path:
        """A new name in tmp/ for work on version ``key`` (:meth:`_sweep` reads it back)."""
        d = self.root / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{key}.{what}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def _remove(path: Path, aside: Path) -> None:
        """Take ``path`` away from readers in one step (a rename into tmp/), then delete it."""
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)

    # ---------------------------------------------------------------- evicting
    def evict(self) -> list[str]:
        """Evict least recently used versions no process uses until the blobs fit ``max_bytes``; return
        the evicted keys. Versions in use stay, even when that leaves the cache over its bound."""
        evicted: list[str] = []
        with self._flock(".lock"):
            self._sweep()
            total = self._drop_orphan_blobs()  # and the blobs only a swept leftover linked to
            if self.max_bytes is None or total <= self.max_bytes:
                return []
            versions = self.root / "versions"
            entries = sorted(versions.iterdir(), key=lambda p: p.stat().st_mtime) if versions.is_dir() else []
            for entry in entries:
                if total <= self.max_bytes:
                    break
                fd = self._open_lock(f"{entry.name}.use")
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a replica on this node uses it
                    self._remove(entry, self._tmp(entry.name, "evict"))  # gone for readers in one step
                    total = self._drop_orphan_blobs()
                    evicted.append(entry.name)
                    self.stats["evicted"] += 1
                    logger.info(
                        "node cache: evicted version %s (unused, least recently used)", entry.name[:12]
                    )
                finally:
                    os.close(fd)
            if total > self.max_bytes:
                logger.warning(
                    "node cache %s holds %.2f GB, over its bound of %.2f GB: every version left is in use",
                    self.root,
                    total / 1e9,
                    self.max_bytes / 1e9,
                )
        return evicted

    def _sweep(self) -> list[str]:
        """Under the cache lock: remove what killed processes left in tmp/ (a half-built version and the
        blob links it holds, a partial download, a version moved aside or being evicted); return the
        names removed. An entry for version ``key`` has no live writer when ``key``'s fill lock can be
        taken without waiting (its writer holds it while the entry exists); an evictor holds the cache
        lock, so its entries are all dead here."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return []
        swept: list[str] = []

        def remove(p: Path) -> None:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            swept.append(p.name)

        by_key: dict[str, list[Path]] = {}
        for p in tmp.iterdir():
            m = _TMP_RE.match(p.name)
            if m is not None and m["what"] != "evict":
                by_key.setdefault(m["key"], []).append(p)
            elif m is not None or p.name.startswith("evict-"):
                remove(p)
            else:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - p.lstat().st_mtime > _ORPHAN_TMP_S:
                        remove(p)
        for key, paths in by_key.items():
            fd = self._open_lock(f"{key}.fill")
            try:
                if not try_lock(fd, fcntl.LOCK_EX):
                    continue  # a live writer: its entries are in use
                for p in paths:
                    if p.exists() or p.is_symlink():
                        remove(p)
            finally:
                os.close(fd)
        if swept:
            logger.info(
                "node cache %s: swept %d leftover(s) of killed processes: %s",
                self.root,
                len(swept),
                swept[:3],
            )
        return swept

    def _drop_orphan_blobs(self) -> int:
        """Under the cache lock: remove blobs no version links to; return the bytes left."""
        total = 0
        blobs = self.root / "blobs"
        for p in blobs.iterdir() if blobs.is_dir() else ():
            st = p.stat()
            if st.st_nlink <= 1:
                p.unlink()
            else:
                total += st.st_size
        return total

    # ------------------------------------------------------------------ locks
    def _blob(self, digest: str) -> Path:
        d = self.root / "blobs"
        d.mkdir(parents=True, exist_ok=True)
        return d / digest

    def _open_lock(self, name: str) -> int:
        """A lock file's descriptor (``.lock``: the cache's own). Lock files are never deleted: another
        process could be about to lock the deleted file while a new one is locked by a third."""
        d = self.root if name == ".lock" else self.root / "locks"
        d.mkdir(parents=True, exist_ok=True)
        return os.open(d / name, os.O_RDWR | os.O_CREAT, 0o666)

    @contextlib.contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        fd = self._open_lock(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
