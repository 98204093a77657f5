"""A node-local cache of versions fetched from a remote storage root, shared by the replicas on one node.

Layout under the cache directory (a hostPath or local NVMe volume in Kubernetes)::

    blobs/<sha256>          one file per distinct content, verified as it was downloaded
    versions/<key>/         a fetched version: hard links to its blobs, MANIFEST.json written last;
                            <key> is the sha256 of the manifest's file table, so a version whose content
                            is already on the node (under any name) is never downloaded again
    locks/<key>.fill        flock, exclusive: one process downloads or repairs a version, the others wait
    locks/<key>.use         flock, shared: held by every process using the version (a :class:`Lease`);
                            the evictor takes it exclusively, without waiting, so a version in use is
                            never evicted. Locks go with their process: a killed replica holds nothing.
    .lock                   flock, exclusive: placing blobs and links, and evicting (short steps)
    tmp/                    downloads in flight

Every file of a cached version is checked against the manifest's sha256 whenever a replica takes it; a
file that differs (a flipped bit, a truncated write) is downloaded again. Files larger than one part are
downloaded as parallel ranged reads (``download_streams`` at a time), hashed and written in order as the
parts arrive. Beyond ``max_bytes`` the least recently used versions that no process uses are evicted,
then the blobs no version links to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CacheError", "Lease", "NodeCache", "content_key"]

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_HASH_CHUNK = 1 << 20


class CacheError(OSError):
    """A download whose bytes do not match the manifest, or a cache directory that cannot be used."""


def content_key(files: dict[str, str]) -> str:
    """The version's content: sha256 of its file table (relative path -> sha256), canonical JSON."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@dataclass
class Lease:
    """A version in use by this process: its folder, kept from eviction until :meth:`release`."""

    path: Path
    key: str
    _fd: int | None = field(repr=False)

    def release(self) -> None:
        """Let the version be evicted (once no other process uses it); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops its flock

    def __del__(self) -> None:
        self.release()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class NodeCache:
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

    def __repr__(self) -> str:
        return f"NodeCache({str(self.root)!r})"

    # ------------------------------------------------------------------ taking
    def get(self, fs: Any, remote: str, manifest: dict[str, Any]) -> Lease:
        """The version under ``remote`` (on ``fs``), described by ``manifest``, as a leased local folder:
        taken from the node when its content is there and verifies, else downloaded once for the node.
        The caller runs :meth:`evict` once it has released what it no longer uses."""
        files = _files(manifest, remote)
        key = content_key(files)
        entry = self.root / "versions" / key
        use_fd = self._open_lock(f"{key}.use")
        try:
            fcntl.flock(use_fd, fcntl.LOCK_SH)  # from here on this version is not evicted
            bad = self._check(entry, files) if self._complete(entry) else None
            if bad == []:
                self.stats["hits"] += 1
            else:
                with self._flock(f"{key}.fill"):  # one process downloads, the others wait for it
                    self._fill(fs, remote, manifest, files, entry)
            os.utime(entry)  # last use, for LRU eviction
        except BaseException:
            os.close(use_fd)
            raise
        return Lease(entry, key, use_fd)

    def _fill(
        self, fs: Any, remote: str, manifest: dict[str, Any], files: dict[str, str], entry: Path
    ) -> None:
        """Under the version's fill lock: build it, or repair the files that fail their digest."""
        if not self._complete(entry):
            self._build(fs, remote, manifest, files, entry)
            self.stats["fills"] += 1
            return
        bad = self._check(entry, files)  # again: the process that held the lock may have repaired it
        if not bad:
            self.stats["hits"] += 1
            return
        logger.warning(
            "node cache: %s: %d file(s) fail their sha256 (%s); fetching them again",
            remote,
            len(bad),
            bad[:3],
        )
        for rel in bad:
            self._place(
                self._download(fs, f"{remote}/{rel}", files[rel]), files[rel], entry / rel, replace=True
            )
            self.stats["repairs"] += 1

    def _build(
        self, fs: Any, remote: str, manifest: dict[str, Any], files: dict[str, str], entry: Path
    ) -> None:
        t0 = time.perf_counter()
        staging = self.root / "tmp" / f"{entry.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            for rel, digest in sorted(files.items()):
                if not self._reuse(digest, staging / rel):
                    self._place(self._download(fs, f"{remote}/{rel}", digest), digest, staging / rel)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            entry.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, entry)  # complete or absent: never a half-built version
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("node cache: %s fetched into %s in %.2fs", remote, entry, time.perf_counter() - t0)

    # ------------------------------------------------------------ downloading
    def _reuse(self, digest: str, dest: Path) -> bool:
        """Link the node's blob of ``digest`` at ``dest`` if it is there and verifies."""
        blob = self._blob(digest)
        try:
            if _sha256_file(blob) != digest:
                return False
        except FileNotFoundError:
            return False
        with self._flock(".lock"):  # not evicted between the check and the link
            if not blob.exists():
                return False
            _link(blob, dest)
        return True

    def _place(self, tmp: Path, digest: str, dest: Path, *, replace: bool = False) -> None:
        """Make the verified download ``tmp`` the blob of ``digest`` and link it at ``dest``, in one step
        under the cache lock (a blob linked nowhere is what eviction removes)."""
        with self._flock(".lock"):
            os.replace(tmp, self._blob(digest))  # a corrupt blob is replaced by a new file, not rewritten
            _link(self._blob(digest), dest, replace=replace)

    def _download(self, fs: Any, src: str, digest: str) -> Path:
        """Download ``src`` into a temporary file, verified against ``digest`` on the way; return it."""
        size = int(fs.size(src))
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"blob-{digest[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            got = self.copy(fs, src, size, tmp)
            if got != digest:
                raise CacheError(
                    errno.EIO, f"{src}: downloaded sha256 {got} does not match manifest {digest}"
                )
            os.chmod(tmp, 0o444)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.stats["files_downloaded"] += 1
        self.stats["bytes_downloaded"] += size
        return tmp

    def copy(self, fs: Any, src: str, size: int, dest: Path) -> str:
        """Copy ``src`` (``size`` bytes) to ``dest`` in ranged parts, ``streams`` in flight, hashed and
        written in order; return the sha256 of what was written."""
        h = hashlib.sha256()
        part = self.part_bytes
        offsets = list(range(0, size, part))
        with open(dest, "wb") as out:
            if len(offsets) <= 1 or self.streams == 1:
                for off in offsets:  # one stream: part after part
                    data = fs.cat_file(src, start=off, end=min(size, off + part))
                    h.update(data)
                    out.write(data)
            else:
                with ThreadPoolExecutor(self.streams, thread_name_prefix="fetch") as pool:
                    window: list[Future[bytes]] = []
                    pending = iter(offsets)
                    for off in pending:  # keep ``streams`` parts in flight, consume them in order
                        window.append(pool.submit(fs.cat_file, src, start=off, end=min(size, off + part)))
                        if len(window) >= self.streams:
                            data = window.pop(0).result()
                            h.update(data)
                            out.write(data)
                    for fut in window:
                        data = fut.result()
                        h.update(data)
                        out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if dest.stat().st_size != size:
            raise CacheError(errno.EIO, f"{src}: got {dest.stat().st_size} bytes, expected {size}")
        return h.hexdigest()

    # ---------------------------------------------------------------- checking
    @staticmethod
    def _complete(entry: Path) -> bool:
        return (entry / MANIFEST).is_file()

    def _check(self, entry: Path, files: dict[str, str]) -> list[str]:
        """The files of ``entry`` that are missing or fail their sha256 (hashed in parallel)."""

        def bad(rel: str) -> bool:
            try:
                return _sha256_file(entry / rel) != files[rel]
            except OSError:
                return True

        with ThreadPoolExecutor(min(self.streams, max(1, len(files)))) as pool:
            flags = list(pool.map(bad, sorted(files)))
        return [rel for rel, b in zip(sorted(files), flags, strict=True) if b]

    # ---------------------------------------------------------------- evicting
    def evict(self) -> list[str]:
        """Evict least recently used versions no process uses until the blobs fit ``max_bytes``; return
        the evicted keys. Versions in use stay, even when that leaves the cache over its bound."""
        if self.max_bytes is None:
            return []
        evicted: list[str] = []
        with self._flock(".lock"):
            total = self._blob_bytes()
            if total <= self.max_bytes:
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
                    doomed = self.root / "tmp" / f"evict-{entry.name}-{uuid.uuid4().hex[:8]}"
                    doomed.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(entry, doomed)  # gone for readers in one step
                    shutil.rmtree(doomed, ignore_errors=True)
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

    def _blob_bytes(self) -> int:
        blobs = self.root / "blobs"
        return sum(p.stat().st_size for p in blobs.iterdir()) if blobs.is_dir() else 0

    def _drop_orphan_blobs(self) -> int:
        """Under the cache lock: remove blobs no version links to; return the bytes left."""
        total = 0
        for p in (self.root / "blobs").iterdir():
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


def _files(manifest: dict[str, Any], where: str) -> dict[str, str]:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CacheError(errno.EINVAL, f"{where}: manifest lists no files")
    for rel, digest in files.items():
        parts = Path(rel).parts
        if not isinstance(digest, str) or len(digest) != 64 or Path(rel).is_absolute() or ".." in parts:
            raise CacheError(
                errno.EINVAL, f"{where}: manifest entry {rel!r}: {digest!r} is not a file and sha256"
            )
    return {str(k): str(v) for k, v in files.items()}


def _link(blob: Path, dest: Path, *, replace: bool = False) -> None:
    """Hard-link ``blob`` at ``dest`` (atomically replacing what is there when ``replace``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        os.link(blob, dest)
        return
    tmp = dest.with_name(f".link-{uuid.uuid4().hex[:8]}")
    os.link(blob, tmp)
    os.replace(tmp, dest)
