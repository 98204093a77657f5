"""Shared storage: one interface over local paths and fsspec URLs, with atomic versioned publication.

Layout under the root::

    experts/<name>/<version>/    an expert LoRA adapter (+ deploy_metadata.json, MANIFEST.json)
    experts/<name>/CURRENT       pointer to the version servers load
    router/<name>/<version>/     the routing adapter, same shape
    merged/<name>/<version>/     a merged model (+ merge_metadata.json, MANIFEST.json)
    merged/<name>/CURRENT
    probes/<name>/<version>/     a probe set that verifies merges (probes.json + images)
    state/<name>.json            a small controller state ({"revision": n, "data": ...}), compare-and-swap

A version is written under a fresh name that nothing points to, closed by ``MANIFEST.json`` (sha256 of
every file) written last, re-read and verified, and only then made current by replacing the small
``CURRENT`` pointer in one atomic step (``os.replace`` locally, a single-object PUT on object stores).
A writer killed at any moment therefore leaves the old version current and no version a reader takes.

Pointers and states are written with compare-and-swap (:mod:`moe_core.cas`): a lock file on POSIX roots,
conditional writes (``If-Match`` on the ETag, ``If-None-Match: *``) on S3, checked by a probe write before
the first one. Remote versions are fetched into the node-local cache (:mod:`moe_core.node_cache`), shared
by the replicas on a node and verified against the manifest whenever one is taken.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from moe_core.cas import (
    ANY,
    CasBackend,
    CasProbeRefused,
    CasUnsupported,
    WriteConflict,
    WriteLost,
    cas_backend,
    write_local_atomic,
)
from moe_core.config import StorageConfig, validate_adapter_name
from moe_core.node_cache.cache import NodeCache
from moe_core.node_cache.files import CacheError, Lease

__all__ = [
    "Kind",
    "Progress",
    "StateConflict",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "VersionInfo",
    "sha256_file",
]

logger = logging.getLogger(__name__)

Kind = Literal["expert", "router", "merged", "probes"]
Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, file name)

_KIND_DIRS: dict[Kind, str] = {
    "expert": "experts",
    "router": "router",
    "merged": "merged",
    "probes": "probes",
}
POINTER = "CURRENT"
#: What new_version_id() writes: "v", a UTC timestamp, "-", a short hash (checked on every read).
VERSION_RE = re.compile(r"v[0-9A-Za-z][0-9A-Za-z-]{0,80}")
MANIFEST = "MANIFEST.json"
STATE_DIR = "state"
_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """Storage is missing something or holds something inconsistent."""


class StorageUnavailable(StorageError):
    """The storage itself cannot be read (a volume unmounted, a bucket unreachable): unlike a name with
    no published version, this says nothing about the adapter. Readers keep serving what they hold."""


class StateConflict(StorageError):
    """A state write lost a compare-and-swap: another writer changed the state since it was read."""


@dataclass(frozen=True)
class VersionInfo:
    kind: Kind
    name: str
    version: str
    current: bool
    metadata: dict[str, Any]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def new_version_id(digest: str = "") -> str:
    """Sortable, unique version names: UTC time to the microsecond plus a short content hash."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return f"v{stamp}-{(digest or uuid.uuid4().hex)[:8]}"


def _s3_options(cfg: StorageConfig) -> dict[str, Any]:
    """s3fs's options: endpoint and region when the config names them (else botocore reads the AWS
    environment, credentials included), no listing cache (other processes publish), a connection pool
    for the parallel ranged downloads, bounded timeouts and attempts (botocore's defaults retry an
    unreachable endpoint for 6-19 s before a reader learns of the outage), and the request checksums."""
    client = {k: v for k, v in (("endpoint_url", cfg.endpoint_url), ("region_name", cfg.region)) if v}
    return {
        "client_kwargs": client,
        "use_listings_cache": False,
        "config_kwargs": {
            "max_pool_connections": max(10, 2 * cfg.download_streams),
            "connect_timeout": cfg.connect_timeout_s,
            "read_timeout": cfg.read_timeout_s,
            "retries": {"total_max_attempts": cfg.max_attempts, "mode": "standard"},
            "request_checksum_calculation": cfg.request_checksum_calculation,
        },
    }


def _transport_errors(fs: Any) -> tuple[type[BaseException], ...]:
    """What a storage call raises when the store, not the object, is the problem: OSError (s3fs turns
    S3's error answers into OSError subclasses; a local volume raises them itself), and on S3 botocore's
    own errors, which s3fs lets through as they are: no connection, a timeout, no credentials
    (``BotoCoreError``), and aiohttp's. Those modules are imported only for an s3fs filesystem."""
    errors: list[type[BaseException]] = [OSError]
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a"}:
        with contextlib.suppress(ImportError):
            from botocore.exceptions import BotoCoreError

            errors.append(BotoCoreError)
        with contextlib.suppress(ImportError):
            from aiohttp import ClientError

            errors.append(ClientError)
    return tuple(errors)


#: fsspec options per URL scheme (first match); other schemes get none.
_FS_OPTIONS: list[tuple[tuple[str, ...], Callable[[StorageConfig], dict[str, Any]]]] = [
    (("s3://", "s3a://"), _s3_options),
]


class Storage:
    """The storage root named by a local path or an fsspec URL (``s3://bucket/prefix``, ``memory://x``).

    ``settings`` carries the rest of the config's ``storage`` section (endpoint, region, node cache bound,
    download streams, ``single_writer``); :meth:`from_config` builds one from it.
    """

    def __init__(
        self,
        url: str,
        cache_dir: str | os.PathLike[str] = ".cache/storage",
        *,
        settings: StorageConfig | None = None,
    ) -> None:
        self.url = url
        self.settings = settings or StorageConfig(url=url, cache_dir=str(cache_dir))
        options = next((f(self.settings) for schemes, f in _FS_OPTIONS if url.startswith(schemes)), {})
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as e:  # s3fs missing: name the extra that brings it
            raise StorageError(f"storage {url}: {e}; install the extra: pip install '.[s3]'") from e
        self.local = isinstance(self.fs, LocalFileSystem)
        if hasattr(self.fs, "retries"):  # s3fs's own retry loop (around reading a body): the same bound
            self.fs.retries = self.settings.max_attempts
        #: errors that mean the storage, not the object asked for, failed (StorageUnavailable)
        self._io_errors = _transport_errors(self.fs)
        self.root = str(Path(root).resolve()) if self.local else root.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.node_cache = NodeCache(
            self.cache_dir,
            max_bytes=self.settings.cache_max_bytes,
            streams=self.settings.download_streams,
            part_bytes=self.settings.download_part_mb << 20,
        )
        self._cas_backend: CasBackend | None = None
        self._leases: dict[tuple[Kind, str], Lease] = {}
        self._leases_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        """The storage a config's ``storage`` section names."""
        return cls(cfg.url, cfg.cache_dir, settings=cfg)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def _unreadable(self, path: str, e: BaseException) -> StorageUnavailable:
        return StorageUnavailable(f"storage {self.url} cannot be read: {path}: {_describe(e)}")

    @contextlib.contextmanager
    def _writing(self, path: str) -> Iterator[None]:
        """The store's failures while writing ``path`` (the network, a permission, a full volume) as
        :class:`StorageUnavailable` naming it."""
        try:
            yield
        except StorageError:
            raise
        except self._io_errors as e:
            raise StorageUnavailable(f"storage {self.url} cannot be written: {path}: {_describe(e)}") from e

    @contextlib.contextmanager
    def _reading(self, path: str) -> Iterator[None]:
        """The store's own failures while reading ``path`` as :class:`StorageUnavailable`; a missing
        object (FileNotFoundError) is left to the caller."""
        try:
            yield
        except (FileNotFoundError, StorageError):
            raise
        except self._io_errors as e:
            raise self._unreadable(path, e) from e

    def check_reachable(self) -> None:
        """Raise :class:`StorageUnavailable` unless the root can be listed. A serving replica asks when a
        name it serves reads as unpublished: a store it has served from has a root, so a root that is
        gone (an unmounted volume, a bucket out of reach) is an outage, not a deletion."""
        try:
            if self.fs.exists(self.root) and self.fs.isdir(self.root):
                self.fs.ls(self.root, detail=False)
                return
            problem = "its root is missing"
        except self._io_errors as e:
            problem = _describe(e)
        raise StorageUnavailable(f"storage {self.url} cannot be read: {problem}")

    # ----------------------------------------------------------------- layout
    def slot(self, kind: Kind, name: str) -> str:
        """The folder holding every version of one adapter or merged model."""
        validate_adapter_name(name)
        return f"{self.root}/{_KIND_DIRS[kind]}/{name}"

    def names(self, kind: Kind) -> list[str]:
        """Names with a current version, sorted."""
        base = f"{self.root}/{_KIND_DIRS[kind]}"
        with self._reading(base):
            if not self.fs.exists(base):
                return []
            listed = self.fs.ls(base, detail=False)
        out = []
        for p in listed:
            name = str(p).rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith(".") and self.current_version(kind, name) is not None:
                out.append(name)
        return sorted(out)

    # ---------------------------------------------------------------- reading
    def current_version(self, kind: Kind, name: str) -> str | None:
        path = f"{self.slot(kind, name)}/{POINTER}"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except self._io_errors as e:  # permissions, I/O, the network: the storage, not the name
            raise self._unreadable(path, e) from e
        return self._pointer_version(path, raw)

    @staticmethod
    def _pointer_version(path: str, raw: bytes | None) -> str | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as e:  # not JSON, or not UTF-8
            raise StorageError(f"{path}: pointer is not JSON ({e})") from e
        version = data.get("version") if isinstance(data, dict) else None
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            # joined into paths by every reader: never trusted as it stands ("../../x")
            raise StorageError(f"{path}: pointer holds no valid version: {str(data)[:200]!r}")
        return version

    def versions(self, kind: Kind, name: str) -> list[str]:
        """Complete versions (closed by a manifest), oldest first."""
        slot = self.slot(kind, name)
        found = []
        with self._reading(slot):
            if not self.fs.exists(slot):
                return []
            for p in self.fs.ls(slot, detail=False):
                v = str(p).rstrip("/").rsplit("/", 1)[-1]
                if v.startswith("v") and self.fs.exists(f"{slot}/{v}/{MANIFEST}"):
                    found.append(v)
        return sorted(found)

    def manifest(self, kind: Kind, name: str, version: str) -> dict[str, Any]:
        path = f"{self.slot(kind, name)}/{version}/{MANIFEST}"
        with self._reading(path):
            return dict(json.loads(self.fs.cat_file(path)))

    def read_json(self, kind: Kind, name: str, filename: str, version: str | None = None) -> dict[str, Any]:
        version = version or self._require_current(kind, name)
        path = f"{self.slot(kind, name)}/{version}/{filename}"
        with self._reading(path):
            return dict(json.loads(self.fs.cat_file(path)))

    def info(self, kind: Kind, name: str, metadata_file: str) -> list[VersionInfo]:
        cur = self.current_version(kind, name)
        return [
            VersionInfo(kind, name, v, v == cur, self.read_json(kind, name, metadata_file, v))
            for v in self.versions(kind, name)
        ]

    def fetch(self, kind: Kind, name: str, version: str | None = None) -> tuple[Path, str]:
        """A local folder holding ``version`` (default: current) and the version's name.

        Local roots are read in place; remote ones are taken from the node cache (downloaded once per node,
        verified against the manifest whenever taken) and leased to this process until it fetches
        another version of ``name``, calls :meth:`release` or exits: a version in use is never evicted.
        """
        version = version or self._require_current(kind, name)
        remote = f"{self.slot(kind, name)}/{version}"
        gone = f"{kind} {name!r} version {version}: a file of it is gone from storage (pruned while it was read?)"
        if self.local:  # read in place: every file checked against the manifest first
            folder = Path(remote)
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError) as e:
                raise StorageError(f"{kind} {name!r} version {version}: no readable manifest ({e})") from e
            try:
                _verify(folder, manifest)
            except FileNotFoundError as e:
                raise StorageError(f"{gone}: {e}") from e
            except OSError as e:
                raise self._unreadable(remote, e) from e
            return folder, version
        manifest = self._remote_manifest(kind, name, version)
        try:
            lease = self.node_cache.get(self.fs, remote, manifest)
        except CacheError as e:
            raise StorageError(f"{kind} {name!r} version {version}: {e}") from e
        except FileNotFoundError as e:
            raise StorageError(f"{gone}: {e}") from e
        except self._io_errors as e:
            raise self._unreadable(remote, e) from e
        with self._leases_lock:  # this process now uses this version of the name, not the one before
            old, self._leases[(kind, name)] = self._leases.get((kind, name)), lease
        if old is not None:
            old.release()
        self.node_cache.evict()  # beyond the bound: versions no process on the node uses, oldest first
        return lease.path, version

    def release(self, kind: Kind, name: str) -> None:
        """This process no longer uses the version of ``name`` it fetched: the node cache may evict it
        (a process's versions are also released when it exits, or when it fetches a newer one)."""
        with self._leases_lock:
            lease = self._leases.pop((kind, name), None)
        if lease is not None:
            lease.release()

    def _remote_manifest(self, kind: Kind, name: str, version: str) -> dict[str, Any]:
        path = f"{self.slot(kind, name)}/{version}/{MANIFEST}"
        try:
            return dict(json.loads(self.fs.cat_file(path)))
        except FileNotFoundError as e:
            raise StorageError(f"{kind} {name!r} version {version}: no manifest at {path}") from e
        except self._io_errors as e:
            raise self._unreadable(path, e) from e
        except (ValueError, TypeError) as e:
            raise StorageError(f"{path}: manifest is not a JSON object ({e})") from e

    def _require_current(self, kind: Kind, name: str) -> str:
        v = self.current_version(kind, name)
        if v is None:
            raise StorageError(f"no published {kind} named {name!r} in {self.url}")
        return v

    # ---------------------------------------------------------------- writing
    def publish(
        self,
        kind: Kind,
        name: str,
        src: Path,
        *,
        version: str | None = None,
        make_current: bool = True,
        progress: Progress | None = None,
        expect: str | object | None = ANY,
    ) -> str:
        """Copy the files of ``src`` into a new version and (by default) make it current atomically
        (only if the current version is still ``expect``, when given: see :meth:`set_current`)."""
        found = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST)
        # dot-names (.gitattributes, .DS_Store, an editor's swap file) are never part of a version: the
        # node cache refuses a manifest naming one, and removes what a manifest does not name
        files = [p for p in found if not any(part.startswith(".") for part in p.relative_to(src).parts)]
        if len(files) < len(found):
            logger.info(
                "%s: not published (dot-names): %s", src, [str(p) for p in found if p not in files][:5]
            )
        if not files:
            raise StorageError(f"{src}: nothing to publish for {kind} {name!r}")
        hashes = {p.relative_to(src).as_posix(): sha256_file(p) for p in files}
        digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        version = version or new_version_id(digest)
        slot = self.slot(kind, name)
        manifest = {"version": version, "files": hashes, "created_at": _now()}
        t0 = time.perf_counter()
        if make_current:  # a store that cannot swap the pointer safely is refused before the upload
            self.check_compare_and_swap()
        self._gc_partial(slot)
        staging = f"{slot}/.tmp-{uuid.uuid4().hex}" if self.local else f"{slot}/{version}"
        self._copy_in(src, files, staging, progress)
        with self._writing(f"{staging}/{MANIFEST}"):
            self._write_bytes(f"{staging}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        final = f"{slot}/{version}"
        with self._writing(final):
            if self.local:
                os.rename(staging, final)
            _verify_remote(self.fs, final, manifest)
        logger.info(
            "%s %s: wrote version %s (%d files) in %.2fs",
            kind,
            name,
            version,
            len(files),
            time.perf_counter() - t0,
        )
        if make_current:
            self.set_current(kind, name, version, expect=expect)
        return version

    def set_current(self, kind: Kind, name: str, version: str, *, expect: str | object | None = ANY) -> None:
        """Point ``CURRENT`` at a complete version, atomically.

        With ``expect`` (a version, or None for "nothing published yet") it is a compare-and-swap: the
        pointer moves only if it still names ``expect``, so a writer that started from an older state
        (a merge that began before a newer one finished) cannot win by finishing last. Of two writers
        that read the same pointer exactly one wins: on POSIX roots a lock file serialises them, on S3
        the PUT is conditional on the ETag that was read (see :mod:`moe_core.cas`).
        """
        if version not in self.versions(kind, name):
            raise StorageError(f"{kind} {name!r} has no complete version {version!r}")
        path = f"{self.slot(kind, name)}/{POINTER}"
        data = json.dumps({"version": version, "updated_at": _now(), "writer": uuid.uuid4().hex}).encode()
        backend = self._cas()
        lost = StorageError(
            f"{kind} {name!r}: the current version changed while {version} was being made current, "
            f"not by this writer; {version} is not made current (a newer write won)"
        )
        with backend.guard(f"{self.slot(kind, name)}/.lock"):
            raw, token = self._read_pointer(backend, path)
            if expect is not ANY:
                now = self._pointer_version(path, raw)
                if now != expect:
                    raise StorageError(
                        f"{kind} {name!r}: current version is {now}, not {expect} as this writer expected; "
                        f"{version} is not made current (a newer write won)"
                    )
            try:
                with self._writing(path):
                    backend.write(path, data, token if expect is not ANY else ANY)
            except WriteLost as e:
                raise lost from e
            except WriteConflict as e:
                raise StorageError(
                    f"{kind} {name!r}: {e}; {version} is not made current: read the pointer again and retry"
                ) from e
        logger.info("%s %s: current version is now %s", kind, name, version)

    def _read_pointer(self, backend: CasBackend, path: str) -> tuple[bytes | None, str | None]:
        try:
            return backend.read(path)
        except self._io_errors as e:
            raise self._unreadable(path, e) from e

    def check_compare_and_swap(self) -> None:
        """Refuse (:class:`StorageError`) a store on which two writers of a pointer or a state could both
        win: one without conditional writes (a probe write finds out), unless ``single_writer`` is set.
        Writers call it when they start; the first pointer or state write calls it too."""
        self._cas()

    def _cas(self) -> CasBackend:
        if self._cas_backend is None:
            no_answer: tuple[type[BaseException], ...] = (*self._io_errors, WriteConflict)
            try:
                backend = cas_backend(self.fs, single_writer=self.settings.single_writer)
                backend.probe(self.root)
            except (CasUnsupported, CasProbeRefused) as e:
                raise StorageError(str(e)) from e
            except no_answer as e:  # tried again by the next writer
                raise StorageUnavailable(
                    f"storage {self.url} cannot be written: the compare-and-swap probe write under "
                    f"{self.root} failed: {_describe(e)}"
                ) from e
            if self.settings.single_writer and not self.local:
                logger.warning(
                    "storage %s: single_writer: pointers and state are written unconditionally", self.url
                )
            self._cas_backend = backend
        return self._cas_backend

    # ------------------------------------------------------------------ state
    def state_path(self, name: str) -> str:
        """Where the state ``name`` lives; names follow the adapter-name rule, as they are path parts."""
        validate_adapter_name(name)
        return f"{self.root}/{STATE_DIR}/{name}.json"

    def read_state(self, name: str) -> tuple[dict[str, Any], int]:
        """The state ``name`` and its revision; ``({}, 0)`` when nothing was written yet."""
        path = self.state_path(name)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return {}, 0
        except self._io_errors as e:  # permissions, I/O, the network: the storage, not the state
            raise self._unreadable(path, e) from e
        return self._parse_state(path, raw)

    @staticmethod
    def _parse_state(path: str, raw: bytes | None) -> tuple[dict[str, Any], int]:
        if raw is None:
            return {}, 0
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StorageError(f"{path}: state is not JSON ({e})") from e
        revision = doc.get("revision") if isinstance(doc, dict) else None
        data = doc.get("data") if isinstance(doc, dict) else None
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
            raise StorageError(f"{path}: expected a revision >= 1, got {str(revision)[:100]!r}")
        if not isinstance(data, dict):
            raise StorageError(f"{path}: expected an object under 'data', got {type(data).__name__}")
        return data, revision

    def write_state(self, name: str, data: dict[str, Any], *, expect: int) -> int:
        """Replace the state ``name`` if its revision is still ``expect`` (0: nothing written yet); return
        the new revision, or raise :class:`StateConflict` when another writer got there first.

        Of two writers that read the same revision exactly one wins: on POSIX roots a lock file
        serialises read, compare and replace; on S3 the PUT is conditional on the ETag of the bytes
        compared (``If-None-Match: *`` for the first write), so the store refuses the second writer.
        """
        if not isinstance(data, dict):
            raise TypeError(f"state {name!r}: expected a dict, got {type(data).__name__}")
        path = self.state_path(name)
        backend = self._cas()

        def conflict(now: int | str) -> StateConflict:
            return StateConflict(
                f"state {name!r} is at revision {now}, not {expect} as this writer expected: it was "
                "changed since it was read; read it again and retry"
            )

        with backend.guard(f"{self.root}/{STATE_DIR}/.{name}.lock"):
            raw, token = self._read_pointer(backend, path)
            _, now = self._parse_state(path, raw)
            if now != expect:
                raise conflict(now)
            revision = expect + 1
            doc = {"revision": revision, "data": data, "writer": uuid.uuid4().hex}
            try:
                with self._writing(path):
                    backend.write(path, json.dumps(doc, indent=2, sort_keys=True).encode(), token)
            except WriteLost as e:
                raise conflict(f"> {expect}") from e
            except WriteConflict as e:
                raise StateConflict(f"state {name!r}: {e}; read it again and retry") from e
        logger.info("state %s: wrote revision %d", name, revision)
        return revision

    def rollback(self, kind: Kind, name: str, to: str | None = None) -> str:
        """Make the previous complete version (or ``to``) current; return it. Only from the version it
        read: one made current meanwhile (a merge finishing) is never silently undone (StorageError)."""
        cur = self._require_current(kind, name)
        versions = self.versions(kind, name)
        if to is None:
            older = [v for v in versions if v < cur]
            if not older:
                raise StorageError(f"{kind} {name!r}: no version older than {cur} to roll back to")
            to = older[-1]
        self.set_current(kind, name, to, expect=cur)
        return to

    def prune(self, kind: Kind, name: str, keep: int, *, writer_grace_s: float = 3600.0) -> list[str]:
        """Delete old versions, keeping the newest ``keep``. Never deleted: the current version, the one
        current just before it (replicas may still be loading it), and a version newer than the current
        one written within ``writer_grace_s`` (another writer's, about to be made current)."""
        cur = self.current_version(kind, name)
        versions = self.versions(kind, name)
        if cur is None or keep <= 0:
            return []
        older = [v for v in versions if v < cur]
        protected = {cur, *older[-1:]}
        protected |= {v for v in versions if v > cur and _age_s(v) < writer_grace_s}
        doomed = [v for v in versions[:-keep] if v not in protected]
        for v in doomed:
            with self._writing(f"{self.slot(kind, name)}/{v}"):
                self.fs.rm(f"{self.slot(kind, name)}/{v}", recursive=True)
            logger.info("%s %s: pruned version %s", kind, name, v)
        return doomed

    def _copy_in(self, src: Path, files: Iterable[Path], dest: str, progress: Progress | None) -> None:
        files = list(files)
        total = sum(p.stat().st_size for p in files)
        done = 0
        for p in files:
            rel = p.relative_to(src).as_posix()
            target = f"{dest}/{rel}"
            with self._writing(target):
                if self.local:
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    with open(p, "rb") as fin, open(target, "wb") as fout:
                        while chunk := fin.read(_CHUNK):
                            fout.write(chunk)
                        fout.flush()
                        os.fsync(fout.fileno())
                else:
                    self.fs.put_file(str(p), target)
            done += p.stat().st_size
            if progress is not None:
                progress(done, total, rel)

    def _write_bytes(self, path: str, data: bytes) -> None:
        """Replace one small file atomically."""
        if self.local:
            write_local_atomic(path, data)
        else:  # one PUT: object stores replace an object atomically
            self.fs.pipe_file(path, data)

    def _gc_partial(self, slot: str, older_than_s: float = 3600.0) -> None:
        """Remove leftovers of killed writers after an hour: local staging folders, and on object stores
        version folders that never got their manifest (a version id says when it was started)."""
        if not self.local:
            try:
                entries = self.fs.ls(slot, detail=False) if self.fs.exists(slot) else []
            except self._io_errors:
                return
            for p in entries:
                v = str(p).rstrip("/").rsplit("/", 1)[-1]
                if (
                    VERSION_RE.fullmatch(v)
                    and _age_s(v) > older_than_s
                    and not self.fs.exists(f"{slot}/{v}/{MANIFEST}")
                ):
                    with self._writing(f"{slot}/{v}"):
                        self.fs.rm(f"{slot}/{v}", recursive=True)
                    logger.info(
                        "%s: removed version %s that a killed writer left without a manifest", slot, v
                    )
            return
        if not os.path.isdir(slot):
            return
        now = time.time()
        for p in Path(slot).iterdir():
            if p.name.startswith(".tmp-") and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _verify(folder: Path, manifest: dict[str, Any]) -> None:
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


def _verify_remote(fs: Any, folder: str, manifest: dict[str, Any]) -> None:
    for rel, digest in manifest["files"].items():
        h = hashlib.sha256()
        with fs.open(f"{folder}/{rel}", "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise StorageError(f"{folder}/{rel}: sha256 {h.hexdigest()} does not match manifest {digest}")


def _describe(e: BaseException) -> str:
    """An error for a message: botocore's say nothing of their kind, so it is named."""
    return f"{type(e).__name__}: {e}"


def _age_s(version: str) -> float:
    """Seconds since ``version`` was written, from its id (:func:`new_version_id`); 0 if it has no stamp."""
    try:
        stamp = datetime.strptime(version[1:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - stamp).total_seconds()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
