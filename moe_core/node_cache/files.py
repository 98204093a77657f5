"""What the node cache is made of: a manifest's file table, the content key it gives a version, a
lease on a version, hashes, and the lock and link steps the cache takes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

__all__ = [
    "MANIFEST",
    "CacheError",
    "Lease",
    "content_key",
    "link_blob",
    "manifest_files",
    "sha256_file",
    "sha256_stream",
    "try_lock",
]

MANIFEST = "MANIFEST.json"
_HASH_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


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


def sha256_stream(f: IO[bytes]) -> str:
    """The sha256 (hex) of what is left to read in ``f``, read in 1 MiB chunks: what manifests record
    (storage's writer and its remote check use it too)."""
    h = hashlib.sha256()
    while chunk := f.read(_HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex): :func:`sha256_stream` of its content."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def manifest_files(manifest: dict[str, Any], where: str) -> dict[str, str]:
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


def try_lock(fd: int, how: int) -> bool:
    """``flock`` without waiting; False when another holder is in the way. (A failed upgrade from shared
    to exclusive leaves the descriptor unlocked: Linux drops the old lock first.)"""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def link_blob(blob: Path, dest: Path, *, replace: bool = False) -> None:
    """Hard-link ``blob`` at ``dest`` (atomically replacing what is there when ``replace``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        os.link(blob, dest)
        return
    tmp = dest.with_name(f".link-{uuid.uuid4().hex[:8]}")
    os.link(blob, tmp)
    os.replace(tmp, dest)
