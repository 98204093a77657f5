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
    .lock                   flock, exclusive: placing blobs and links, evicting, sweeping (short steps)
    tmp/<key>.<what>-<id>   work in flight, named by the version it is for: a version being built
                            (``build``, hard links to blobs), a download (``blob``), an incomplete
                            version moved aside (``aside``), all written under that version's fill
                            lock; a version being deleted (``evict``), under the cache lock

Every file of a cached version is checked against the manifest's sha256 whenever a replica takes it; a
file that differs (a flipped bit, a truncated write) is downloaded again, a file the manifest does not
name is removed, and a version that lost its ``MANIFEST.json`` is built again (moved aside when no
process uses it, else repaired in place). Files larger than one part are downloaded as parallel ranged
reads (``download_streams`` at a time), hashed and written in order as the parts arrive. Beyond
``max_bytes`` the least recently used versions that no process uses are evicted, then the blobs no
version links to.

What a killed process leaves in ``tmp/`` (a half-built version holding hard links to blobs, a partial
download) is swept when a process starts taking versions and whenever it evicts: an entry whose fill lock
can be taken without waiting has no live writer. Only blobs count against ``max_bytes``; locks, ``tmp/``
and anything else on the volume (``HF_HOME``) do not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from moe_core.cas import write_local_atomic

__all__ = ["CacheError", "Lease", "NodeCache", "content_key"]

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_HASH_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
#: tmp/ entries: ``<key>.<what>-<id>``; the merged code's ``<key>-<id>``, ``blob-...`` and ``evict-...`` too
_TMP_RE = re.compile(r"(?P<key>[0-9a-f]{64})[.-](?:(?P<what>build|blob|aside|evict)-)?")
#: a tmp/ entry that names no version (``blob-...`` of the merged code) is swept once this old
_ORPHAN_TMP_S = 3600.0


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
        self._swept = False  # tmp/ swept once when this process starts taking versions

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
        if not self._swept:  # what killed processes left, before anything is counted or built
            with self._flock(".lock"):
                self._sweep()
            self._swept = True
        use_fd = self._open_lock(f"{key}.use")
        try:
            fcntl.flock(use_fd, fcntl.LOCK_SH)  # from here on this version is not evicted
            if self._complete(entry) and self._problems(entry, files) == ([], []):
                self.stats["hits"] += 1
            else:
                with self._flock(f"{key}.fill"):  # one process downloads, the others wait for it
                    self._fill(fs, remote, manifest, files, entry, use_fd)
            os.utime(entry)  # last use, for LRU eviction
        except BaseException:
            os.close(use_fd)
            raise
        return Lease(entry, key, use_fd)

    def _fill(
        self,
        fs: Any,
        remote: str,
        manifest: dict[str, Any],
        files: dict[str, str],
        entry: Path,
        use_fd: int,
    ) -> None:
        """Under the version's fill lock (``use_fd`` held shared): build it, or repair what fails."""
        if entry.exists() and not self._complete(entry):
            # a version without its manifest (a damaged disk, a hand-made copy) is never taken as it is;
            # with no other process using it, it is moved aside and built again from nothing
            if _try_lock(use_fd, fcntl.LOCK_EX):
                try:
                    logger.warning("node cache: %s: %s has no %s; fetched again", remote, entry, MANIFEST)
                    self._remove(entry, self._tmp(entry.name, "aside"))
                    self._build(fs, remote, manifest, files, entry)
                    self.stats["fills"] += 1
                finally:
                    fcntl.flock(use_fd, fcntl.LOCK_SH)  # a downgrade: never unlocked in between
                return
            # the failed upgrade dropped the shared lock (flock); taken again, the state is read again
            fcntl.flock(use_fd, fcntl.LOCK_SH)
        if not entry.exists():
            self._build(fs, remote, manifest, files, entry)
            self.stats["fills"] += 1
            return
        complete = self._complete(entry)
        bad, extra = self._problems(entry, files)  # again: the last holder of the lock may have repaired it
        if complete and not bad and not extra:
            self.stats["hits"] += 1
            return
        logger.warning(
            "node cache: %s: %d file(s) fail their sha256 (%s), %d not in the manifest (%s)%s; repairing",
            remote,
            len(bad),
            bad[:3],
            len(extra),
            extra[:3],
            "" if complete else f", no {MANIFEST} (another process uses it)",
        )
        for rel in extra:
            (entry / rel).unlink(missing_ok=True)
        for rel in bad:
            self._place(
                self._download(fs, f"{remote}/{rel}", files[rel], entry.name),
                files[rel],
                entry / rel,
                replace=True,
            )
            self.stats["repairs"] += 1
        if not complete:
            write_local_atomic(entry / MANIFEST, json.dumps(manifest, indent=2).encode())
            self.stats["repairs"] += 1

    def _build(
        self, fs: Any, remote: str, manifest: dict[str, Any], files: dict[str, str], entry: Path
    ) -> None:
        t0 = time.perf_counter()
        staging = self._tmp(entry.name, "build")
        staging.mkdir(parents=True)
        try:
            for rel, digest in sorted(files.items()):
                if not self._reuse(digest, staging / rel):
                    self._place(
                        self._download(fs, f"{remote}/{rel}", digest, entry.name), digest, staging / rel
                    )
            # a new file, renamed into place: never written through a link to a blob
            write_local_atomic(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
            entry.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, entry)  # complete or absent: never a half-built version
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("node cache: %s fetched into %s in %.2fs", remote, entry, time.perf_counter() - t0)

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

    def _download(self, fs: Any, src: str, digest: str, key: str) -> Path:
        """Download ``src`` into a temporary file, verified against ``digest`` on the way; return it.
        ``key`` is the version it is for: its fill lock is held while the file is in tmp/."""
        size = int(fs.size(src))
        tmp = self._tmp(key, f"blob-{digest[:16]}")
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
        self.stats["ranged_reads"] += len(offsets)
        with open(dest, "wb") as out:
            if len(offsets) <= 1 or self.streams == 1:
                for off in offsets:  # one stream: part after part
                    data = fs.cat_file(src, start=off, end=min(size, off + part))
                    h.update(data)
                    out.write(data)
            else:
                self.stats["parallel_files"] += 1
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

    def _problems(self, entry: Path, files: dict[str, str]) -> tuple[list[str], list[str]]:
        """The files of ``entry`` that are missing or fail their sha256 (hashed in parallel), and the
        files there that the manifest does not name (as a volume root's fetch refuses them)."""

        def bad(rel: str) -> bool:
            try:
                return _sha256_file(entry / rel) != files[rel]
            except OSError:
                return True

        with ThreadPoolExecutor(min(self.streams, max(1, len(files)))) as pool:
            flags = list(pool.map(bad, sorted(files)))
        present = set()
        for folder, _, names in os.walk(entry):
            rel_dir = Path(folder).relative_to(entry)
            present |= {(rel_dir / n).as_posix() for n in names}
        extra = sorted(present - set(files) - {MANIFEST})
        return [rel for rel, b in zip(sorted(files), flags, strict=True) if b], extra

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
                if not _try_lock(fd, fcntl.LOCK_EX):
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


def _files(manifest: dict[str, Any], where: str) -> dict[str, str]:
    """The manifest's file table, refused unless every entry is a plain relative path (no dot-names,
    not MANIFEST.json itself, written as it will be found) and a lower-case hex sha256."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CacheError(errno.EINVAL, f"{where}: manifest lists no files")
    for rel, digest in files.items():
        path = PurePosixPath(rel) if isinstance(rel, str) else None
        if (
            path is None
            or not isinstance(digest, str)
            or not _DIGEST_RE.fullmatch(digest)
            or path.is_absolute()
            or path.as_posix() != rel
            or "\\" in rel
            or rel == MANIFEST
            or any(part.startswith(".") for part in path.parts)
        ):
            raise CacheError(
                errno.EINVAL, f"{where}: manifest entry {rel!r}: {digest!r} is not a file and sha256"
            )
    return dict(files)


def _try_lock(fd: int, how: int) -> bool:
    """``flock`` without waiting; False when another holder is in the way. (A failed upgrade from shared
    to exclusive leaves the descriptor unlocked: Linux drops the old lock first.)"""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _link(blob: Path, dest: Path, *, replace: bool = False) -> None:
    """Hard-link ``blob`` at ``dest`` (atomically replacing what is there when ``replace``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        os.link(blob, dest)
        return
    tmp = dest.with_name(f".link-{uuid.uuid4().hex[:8]}")
    os.link(blob, tmp)
    os.replace(tmp, dest)
