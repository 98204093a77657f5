"""Writing a storage root: publishing a version, making one current (compare-and-swap), rolling back,
pruning old versions, and clearing what killed writers left."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

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
from moe_core.storage.errors import StorageError, StorageUnavailable, describe
from moe_core.storage.layout import (
    CHUNK,
    MANIFEST,
    POINTER,
    VERSION_RE,
    Kind,
    Progress,
    new_version_id,
    sha256_file,
    utc_stamp,
    verify_remote,
    version_age_s,
)
from moe_core.storage.reading import StorageReader

__all__ = ["StorageWriter"]

#: The package's logger: its records are named ``moe_core.storage`` whichever module writes them.
logger = logging.getLogger("moe_core.storage")


class StorageWriter(StorageReader):
    """What a writer of a storage root needs (:class:`moe_core.storage.store.Storage`)."""

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
        folder = self.versions_dir(kind, name)
        manifest = {"version": version, "files": hashes, "created_at": utc_stamp()}
        t0 = time.perf_counter()
        if make_current:  # a store that cannot swap the pointer safely is refused before the upload
            self.check_compare_and_swap()
        self._gc_partial(folder)
        staging = f"{folder}/.tmp-{uuid.uuid4().hex}" if self.local else f"{folder}/{version}"
        self._copy_in(src, files, staging, progress)
        with self._writing(f"{staging}/{MANIFEST}"):
            self._write_bytes(f"{staging}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        final = f"{folder}/{version}"
        with self._writing(final):
            if self.local:
                os.rename(staging, final)
            verify_remote(self.fs, final, manifest)
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
        path = f"{self.versions_dir(kind, name)}/{POINTER}"
        data = json.dumps(
            {"version": version, "updated_at": utc_stamp(), "writer": uuid.uuid4().hex}
        ).encode()
        backend = self._cas()
        lost = StorageError(
            f"{kind} {name!r}: the current version changed while {version} was being made current, "
            f"not by this writer; {version} is not made current (a newer write won)"
        )
        with backend.guard(f"{self.versions_dir(kind, name)}/.lock"):
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
                    f"{self.root} failed: {describe(e)}"
                ) from e
            if self.settings.single_writer and not self.local:
                logger.warning(
                    "storage %s: single_writer: pointers and state are written unconditionally", self.url
                )
            self._cas_backend = backend
        return self._cas_backend

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
        protected |= {v for v in versions if v > cur and version_age_s(v) < writer_grace_s}
        doomed = [v for v in versions[:-keep] if v not in protected]
        for v in doomed:
            with self._writing(f"{self.versions_dir(kind, name)}/{v}"):
                self.fs.rm(f"{self.versions_dir(kind, name)}/{v}", recursive=True)
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
                        while chunk := fin.read(CHUNK):
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

    def _gc_partial(self, folder: str, older_than_s: float = 3600.0) -> None:
        """Remove leftovers of killed writers after an hour: local staging folders, and on object stores
        version folders that never got their manifest (a version id says when it was started)."""
        if not self.local:
            try:
                entries = self.fs.ls(folder, detail=False) if self.fs.exists(folder) else []
            except self._io_errors:
                return
            for p in entries:
                v = str(p).rstrip("/").rsplit("/", 1)[-1]
                if (
                    VERSION_RE.fullmatch(v)
                    and version_age_s(v) > older_than_s
                    and not self.fs.exists(f"{folder}/{v}/{MANIFEST}")
                ):
                    with self._writing(f"{folder}/{v}"):
                        self.fs.rm(f"{folder}/{v}", recursive=True)
                    logger.info(
                        "%s: removed version %s that a killed writer left without a manifest", folder, v
                    )
            return
        if not os.path.isdir(folder):
            return
        now = time.time()
        for p in Path(folder).iterdir():
            if p.name.startswith(".tmp-") and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
