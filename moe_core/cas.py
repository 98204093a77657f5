"""Compare-and-swap of one small object (a CURRENT pointer, a controller state), per kind of storage.

:meth:`Storage.set_current <moe_core.storage.store.Storage.set_current>` and
:meth:`~moe_core.storage.store.Storage.write_state` read an object, compare what they read with what the writer
expects, and replace it only if nobody changed it in between. How "in between" is closed depends on the
store, so each kind has a backend (first match in :data:`_BACKENDS`):

- a local or shared POSIX volume: a lock file (``flock``) held across read and replace (``os.replace``);
- ``memory://`` (one process's filesystem): a process-wide lock;
- S3 and S3-compatible stores: conditional writes. The read returns the object's ETag; the write is a PUT
  with ``If-Match: <etag>`` (``If-None-Match: *`` when the object did not exist), which the store refuses
  with 412 when the object changed, so of two writers that read the same revision exactly one wins.
  Whether a store honours those headers is checked once per process by :meth:`S3Cas.probe` (a probe
  object written twice); one that ignores them is refused unless the config says ``single_writer``.

Any other store is refused for writing, unless ``single_writer`` is set: then writes are a read followed
by a plain replace, which is only safe with one writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "ANY",
    "CasBackend",
    "CasProbeRefused",
    "CasUnsupported",
    "WriteConflict",
    "WriteLost",
    "cas_backend",
]

logger = logging.getLogger(__name__)

#: ``token`` for an unconditional write (replace whatever is there).
ANY: Any = object()


class WriteLost(Exception):
    """The compare failed at the store: the object changed (or appeared, or went) since it was read."""


class WriteConflict(Exception):
    """The store kept answering that another conditional write to the object was in flight (S3's 409
    ConditionalRequestConflict) after every retry: this write did not happen."""


class CasUnsupported(RuntimeError):
    """This store cannot make a compare-and-swap atomic; the message says why and what to do."""


class CasProbeRefused(RuntimeError):
    """The store refused the probe write for a reason other than its conditional headers (a bad
    request, a permission); the message names the store's error."""


class CasBackend(Protocol):
    def guard(self, lock: str) -> AbstractContextManager[None]:
        """Held across read, compare and write (a lock where the store needs one)."""

    def read(self, path: str) -> tuple[bytes | None, str | None]:
        """The object's bytes (None: absent) and the token a conditional write of it needs."""

    def write(self, path: str, data: bytes, token: str | None) -> None:
        """Replace ``path`` if it still is what the read that gave ``token`` saw (None: it must not exist;
        :data:`ANY`: whatever it is); raise :class:`WriteLost` otherwise."""

    def probe(self, root: str) -> None:
        """Raise :class:`CasUnsupported` unless this store makes :meth:`write`'s compare atomic."""


class LocalCas:
    """POSIX roots: an ``flock`` on a lock file beside the object serialises writers on every machine
    that mounts the volume; the replace is ``os.replace`` of a fsynced temporary file."""

    @contextlib.contextmanager
    def guard(self, lock: str) -> Iterator[None]:
        Path(lock).parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self, path: str) -> tuple[bytes | None, str | None]:
        try:
            return Path(path).read_bytes(), None
        except FileNotFoundError:
            return None, None

    def write(self, path: str, data: bytes, token: str | None) -> None:
        write_local_atomic(path, data)

    def probe(self, root: str) -> None:
        return None


class LockedCas:
    """A filesystem of this process only (``memory://``): a process-wide lock makes the compare atomic."""

    _lock = threading.RLock()

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    @contextlib.contextmanager
    def guard(self, lock: str) -> Iterator[None]:
        with self._lock:
            yield

    def read(self, path: str) -> tuple[bytes | None, str | None]:
        try:
            return bytes(self.fs.cat_file(path)), None
        except FileNotFoundError:
            return None, None

    def write(self, path: str, data: bytes, token: str | None) -> None:
        self.fs.pipe_file(path, data)

    def probe(self, root: str) -> None:
        return None


class UnguardedCas(LockedCas):
    """``single_writer: true`` on a store without conditional writes: read, compare, plain replace. Two
    writers could both win; the config promises there is one."""

    @contextlib.contextmanager
    def guard(self, lock: str) -> Iterator[None]:
        yield


#: Error codes of an S3 PUT whose precondition failed: 412, and 404 for If-Match on a deleted object.
_LOST_CODES = frozenset({"PreconditionFailed", "412", "NoSuchKey", "404"})
#: 409: another conditional write to the key is in flight (AWS); retried, the outcome is then 412 or 200.
_CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "409"})


def _s3_response(e: BaseException) -> dict[str, Any] | None:
    """The S3 error answer behind an exception s3fs raised (it translates botocore's ClientError, whose
    ``response`` it keeps as the cause); None when the store did not answer (the network, a timeout)."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return response
    return None


def _s3_error_code(e: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs raised (it translates botocore's ClientError)."""
    response = _s3_response(e)
    if response is not None:
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code or status)
    if isinstance(e, FileNotFoundError):
        return "NoSuchKey"
    if isinstance(e, FileExistsError):
        return "PreconditionFailed"
    return None


#: Words of an error answer about the conditional headers themselves (a store that does not implement
#: them says so, naming the header: AWS before 2024 answered 501 NotImplemented, Header If-None-Match).
_CONDITION_WORDS = ("if-match", "if-none-match", "ifmatch", "ifnonematch", "conditional", "precondition")


class S3Cas:
    """S3 conditional writes through s3fs: ``put_object`` with ``IfMatch``/``IfNoneMatch`` (botocore
    passes them as the ``If-Match``/``If-None-Match`` headers; AWS honours them since 2024-08/11)."""

    def __init__(self, fs: Any, conflict_retries: int = 5) -> None:
        self.fs = fs
        self.conflict_retries = conflict_retries

    @contextlib.contextmanager
    def guard(self, lock: str) -> Iterator[None]:
        yield  # the store compares: nothing to hold here

    def read(self, path: str) -> tuple[bytes | None, str | None]:
        """Body and ETag from one GET, so the token is that of the bytes compared."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return bytes(body), str(resp["ETag"])

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def _put(self, path: str, data: bytes, condition: dict[str, str]) -> None:
        bucket, key, _ = self.fs.split_path(path)
        for attempt in range(self.conflict_retries + 1):
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
                return
            except OSError as e:
                code = _s3_error_code(e)
                if code in _LOST_CODES:
                    raise WriteLost(f"{path}: {condition} did not hold ({code})") from e
                if code in _CONFLICT_CODES:
                    if attempt < self.conflict_retries:
                        time.sleep(0.05 * 2**attempt)
                        continue
                    raise WriteConflict(
                        f"{path}: {attempt + 1} conditional writes were answered {code} (another "
                        "conditional write to it was in flight); this one did not happen"
                    ) from e
                raise
            finally:
                self.fs.invalidate_cache(path)

    def write(self, path: str, data: bytes, token: str | None) -> None:
        """One conditional PUT (:meth:`CasBackend.write`).

        A request retried after its response was lost (by botocore or s3fs) is refused by the store as
        if another writer had won, so a refusal is checked against the bytes now stored: every writer's
        body is unique (it names the writer), so finding our own means our first attempt won. One case
        stays wrong: if our lost-response write won and another writer then replaced it before this
        read, the write is reported as lost although it was, briefly, current (the other writer read
        our bytes and compared against them, so nothing is lost but the report).
        """
        if token is ANY:
            self._put(path, data, {})
            return
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            self._put(path, data, condition)
        except WriteLost:
            now, _ = self.read(path)
            if now != data:
                raise

    def probe(self, root: str) -> None:
        """Write a probe object twice with ``If-None-Match: *``, then with a wrong and the right
        ``If-Match``: a store that takes the second or third write ignores the headers, one that refuses
        them by name does not implement them (:class:`CasUnsupported`). Any other refusal is named as the
        store gave it (:class:`CasProbeRefused`: a rejected checksum header, a permission); no answer at
        all (the network) is raised as it is."""
        path = f"{root}/.cas-probe-{uuid.uuid4().hex}"
        url = self.fs.unstrip_protocol(root)
        advice = (
            f"storage {url} does not honour conditional writes ({{what}}), so two writers of a CURRENT "
            "pointer or a state could both win. Use a store that does (AWS S3, MinIO, Ceph RGW, ...), or "
            "set storage.single_writer: true if exactly one process at a time writes pointers and state."
        )
        try:
            self._put(path, b"1", {"IfNoneMatch": "*"})
            _, etag = self.read(path)
            checks: list[tuple[str, Callable[[], None]]] = [
                (
                    "If-None-Match: * on an object that exists",
                    lambda: self._put(path, b"2", {"IfNoneMatch": "*"}),
                ),
                ("If-Match with another ETag", lambda: self._put(path, b"3", {"IfMatch": f'"{"0" * 32}"'})),
            ]
            for what, attempt in checks:
                try:
                    attempt()
                except WriteLost:
                    continue
                raise CasUnsupported(advice.format(what=f"{what} was accepted"))
            assert etag is not None
            try:
                self._put(path, b"4", {"IfMatch": etag})
            except WriteLost as e:
                raise CasUnsupported(
                    advice.format(what="If-Match with the object's own ETag was refused")
                ) from e
        except WriteLost as e:
            raise CasUnsupported(advice.format(what=f"the first If-None-Match write was refused: {e}")) from e
        except OSError as e:
            response = _s3_response(e)
            if response is None:
                raise  # no answer from the store: the caller reports an outage
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code, message = error.get("Code") or status, error.get("Message") or str(e)
            said = f"{code}: {message}" + (f" (header {error['Header']})" if error.get("Header") else "")
            if any(w in said.lower() for w in _CONDITION_WORDS):
                raise CasUnsupported(advice.format(what=f"a conditional write was refused: {said}")) from e
            if isinstance(status, int) and status >= 500:
                raise  # the store's own trouble: an outage, not an answer about this store
            hint = ""
            if "checksum" in said.lower() or "crc" in said.lower():
                hint = (
                    "; a store that refuses botocore's request checksums needs "
                    "storage.request_checksum_calculation: when_required"
                )
            raise CasProbeRefused(
                f"storage {url}: the compare-and-swap probe write to {self.fs.unstrip_protocol(path)} "
                f"was refused: {said}{hint}"
            ) from e
        finally:
            with contextlib.suppress(Exception):  # best effort: an outage must not hide the error above
                self.fs.rm_file(path)
        logger.info("storage %s: conditional writes honoured (probe write)", url)


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


#: First match wins: (protocols, backend factory).
_BACKENDS: list[tuple[frozenset[str], Callable[[Any], CasBackend]]] = [
    (frozenset({"file", "local"}), lambda fs: LocalCas()),
    (frozenset({"memory"}), LockedCas),
    (frozenset({"s3", "s3a"}), S3Cas),
]


def cas_backend(fs: Any, *, single_writer: bool) -> CasBackend:
    """The backend for ``fs``; :class:`CasUnsupported` for a store with none, unless ``single_writer``.

    With ``single_writer`` an object store's writes are plain replaces (it may ignore conditional writes:
    that is what the flag is for); a local volume and ``memory://`` keep their lock, which always holds.
    """
    protocols = _protocols(fs)
    for names, factory in _BACKENDS:
        if protocols & names:
            if single_writer and factory is S3Cas:
                return UnguardedCas(fs)
            return factory(fs)
    if single_writer:
        return UnguardedCas(fs)
    raise CasUnsupported(
        f"storage protocol {sorted(protocols)} has no compare-and-swap here (local paths, memory:// and "
        "s3:// do); set storage.single_writer: true if exactly one process at a time writes pointers and "
        "state"
    )


def write_local_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace one small local file atomically: a fsynced temporary file, then ``os.replace``."""
    d = Path(path).parent
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
