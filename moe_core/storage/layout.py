"""The layout under a storage root: kinds and their folders, pointer and manifest names, version ids,
and the checks of a version's files against its manifest."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

# one manifest name and one hash for what storage writes and the node cache checks (both re-exported)
from moe_core.node_cache.files import MANIFEST, sha256_file, sha256_stream
from moe_core.storage.errors import StorageError

__all__ = [
    "CHUNK",
    "KIND_DIRS",
    "MANIFEST",
    "POINTER",
    "STATE_DIR",
    "VERSION_RE",
    "Kind",
    "Progress",
    "VersionInfo",
    "new_version_id",
    "sha256_file",
    "utc_stamp",
    "verify_local",
    "verify_remote",
    "version_age_s",
]

Kind = Literal["expert", "router", "merged", "probes"]
Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, file name)

KIND_DIRS: dict[Kind, str] = {
    "expert": "experts",
    "router": "router",
    "merged": "merged",
    "probes": "probes",
}
POINTER = "CURRENT"
#: What new_version_id() writes: "v", a UTC timestamp, "-", a short hash (checked on every read).
VERSION_RE = re.compile(r"v[0-9A-Za-z][0-9A-Za-z-]{0,80}")
STATE_DIR = "state"
CHUNK = 1 << 20


@dataclass(frozen=True)
class VersionInfo:
    kind: Kind
    name: str
    version: str
    current: bool
    metadata: dict[str, Any]


def new_version_id(digest: str = "") -> str:
    """Sortable, unique version names: UTC time to the microsecond plus a short content hash."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return f"v{stamp}-{(digest or uuid.uuid4().hex)[:8]}"


def verify_local(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names has its sha256, and no other file is there (verified on read)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise StorageError(f"{folder}: manifest lists no files")
    present = {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    }
    extra, missing = sorted(present - set(files)), sorted(set(files) - present)
    if extra or missing:
        raise StorageError(
            f"{folder}: files differ from the manifest (extra {extra[:3]}, missing {missing[:3]})"
        )
    for rel, digest in files.items():
        got = sha256_file(folder / rel)
        if got != digest:
            raise StorageError(f"{folder / rel}: sha256 {got} does not match manifest {digest}")


def verify_remote(fs: Any, folder: str, manifest: dict[str, Any]) -> None:
    for rel, digest in manifest["files"].items():
        with fs.open(f"{folder}/{rel}", "rb") as f:
            got = sha256_stream(f)
        if got != digest:
            raise StorageError(f"{folder}/{rel}: sha256 {got} does not match manifest {digest}")


def version_age_s(version: str) -> float:
    """Seconds since ``version`` was written, from its id (:func:`new_version_id`); 0 if it has no stamp."""
    try:
        stamp = datetime.strptime(version[1:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - stamp).total_seconds()


def utc_stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
