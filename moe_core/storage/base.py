"""A storage root on its filesystem (a local path, or an fsspec URL such as ``s3://bucket/prefix``), and
the store's failures as storage errors."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import fsspec
from fsspec.implementations.local import LocalFileSystem

from moe_core.cas import CasBackend
from moe_core.config import StorageConfig, validate_adapter_name
from moe_core.node_cache.cache import NodeCache
from moe_core.node_cache.files import Lease
from moe_core.storage.errors import StorageError, StorageUnavailable, describe
from moe_core.storage.layout import KIND_DIRS, Kind

__all__ = ["StorageBase"]


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


class StorageBase:
    """A storage root on its filesystem, its settings and node cache, and the store's failures as
    storage errors (:class:`moe_core.storage.store.Storage` is the whole interface)."""

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
    def from_config(cls, cfg: StorageConfig) -> Self:
        """The storage a config's ``storage`` section names."""
        return cls(cfg.url, cfg.cache_dir, settings=cfg)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def _unreadable(self, path: str, e: BaseException) -> StorageUnavailable:
        return StorageUnavailable(f"storage {self.url} cannot be read: {path}: {describe(e)}")

    @contextlib.contextmanager
    def _writing(self, path: str) -> Iterator[None]:
        """The store's failures while writing ``path`` (the network, a permission, a full volume) as
        :class:`StorageUnavailable` naming it."""
        try:
            yield
        except StorageError:
            raise
        except self._io_errors as e:
            raise StorageUnavailable(f"storage {self.url} cannot be written: {path}: {describe(e)}") from e

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
            problem = describe(e)
        raise StorageUnavailable(f"storage {self.url} cannot be read: {problem}")

    # ----------------------------------------------------------------- layout
    def versions_dir(self, kind: Kind, name: str) -> str:
        """The folder holding every version of one adapter or merged model."""
        validate_adapter_name(name)
        return f"{self.root}/{KIND_DIRS[kind]}/{name}"
