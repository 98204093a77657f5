"""Reading a storage root: the names published, their versions and manifests, and a version as a local
folder (read in place, or through the node cache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_core.node_cache.files import CacheError
from moe_core.storage.base import StorageBase
from moe_core.storage.errors import StorageError
from moe_core.storage.layout import KIND_DIRS, MANIFEST, POINTER, VERSION_RE, Kind, VersionInfo, verify_local

__all__ = ["StorageReader"]


class StorageReader(StorageBase):
    """What every reader of a storage root needs (:class:`moe_core.storage.store.Storage`)."""

    def names(self, kind: Kind) -> list[str]:
        """Names with a current version, sorted."""
        base = f"{self.root}/{KIND_DIRS[kind]}"
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
        path = f"{self.versions_dir(kind, name)}/{POINTER}"
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
        folder = self.versions_dir(kind, name)
        found = []
        with self._reading(folder):
            if not self.fs.exists(folder):
                return []
            for p in self.fs.ls(folder, detail=False):
                v = str(p).rstrip("/").rsplit("/", 1)[-1]
                if v.startswith("v") and self.fs.exists(f"{folder}/{v}/{MANIFEST}"):
                    found.append(v)
        return sorted(found)

    def manifest(self, kind: Kind, name: str, version: str) -> dict[str, Any]:
        path = f"{self.versions_dir(kind, name)}/{version}/{MANIFEST}"
        with self._reading(path):
            return dict(json.loads(self.fs.cat_file(path)))

    def read_json(self, kind: Kind, name: str, filename: str, version: str | None = None) -> dict[str, Any]:
        version = version or self._require_current(kind, name)
        path = f"{self.versions_dir(kind, name)}/{version}/{filename}"
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
        remote = f"{self.versions_dir(kind, name)}/{version}"
        gone = f"{kind} {name!r} version {version}: a file of it is gone from storage (pruned while it was read?)"
        if self.local:  # read in place: every file checked against the manifest first
            folder = Path(remote)
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError) as e:
                raise StorageError(f"{kind} {name!r} version {version}: no readable manifest ({e})") from e
            try:
                verify_local(folder, manifest)
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
        path = f"{self.versions_dir(kind, name)}/{version}/{MANIFEST}"
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
