"""Taking a version: from the node when its content is there and verifies, else downloaded once for the
node (in parallel ranged reads), repaired file by file when some fail their sha256."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from moe_core.cas import write_local_atomic
from moe_core.node_cache.directory import CacheDirectory
from moe_core.node_cache.files import (
    MANIFEST,
    CacheError,
    Lease,
    content_key,
    link_blob,
    manifest_files,
    sha256_file,
    try_lock,
)

# imports, __all__ and the package logger shaped as storage/writing.py's, other names: not a duplicate
__all__ = ["NodeCache"]

#: The package's logger: its records are named ``moe_core.node_cache`` whichever module writes them.
logger = logging.getLogger("moe_core.node_cache")


class NodeCache(CacheDirectory):
    """A node-local cache of versions fetched from a remote storage root (:mod:`moe_core.node_cache`)."""

    # ------------------------------------------------------------------ taking
    def get(self, fs: Any, remote: str, manifest: dict[str, Any]) -> Lease:
        """The version under ``remote`` (on ``fs``), described by ``manifest``, as a leased local folder:
        taken from the node when its content is there and verifies, else downloaded once for the node.
        The caller runs :meth:`evict` once it has released what it no longer uses."""
        files = manifest_files(manifest, remote)
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
            if try_lock(use_fd, fcntl.LOCK_EX):
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

    # ------------------------------------------------------------ downloading
    def _reuse(self, digest: str, dest: Path) -> bool:
        """Link the node's blob of ``digest`` at ``dest`` if it is there and verifies."""
        blob = self._blob(digest)
        try:
            if sha256_file(blob) != digest:
                return False
        except FileNotFoundError:
            return False
        with self._flock(".lock"):  # not evicted between the check and the link
            if not blob.exists():
                return False
            link_blob(blob, dest)
        return True

    def _place(self, tmp: Path, digest: str, dest: Path, *, replace: bool = False) -> None:
        """Make the verified download ``tmp`` the blob of ``digest`` and link it at ``dest``, in one step
        under the cache lock (a blob linked nowhere is what eviction removes)."""
        with self._flock(".lock"):
            os.replace(tmp, self._blob(digest))  # a corrupt blob is replaced by a new file, not rewritten
            link_blob(self._blob(digest), dest, replace=replace)

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
                return sha256_file(entry / rel) != files[rel]
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
