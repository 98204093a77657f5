"""The storage root as its users see it: versions read and written, and the small controller states
(``state/<name>.json``), replaced by compare-and-swap."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from moe_core.cas import WriteConflict, WriteLost
from moe_core.config import validate_adapter_name
from moe_core.storage.errors import StateConflict, StorageError
from moe_core.storage.layout import STATE_DIR
from moe_core.storage.writing import StorageWriter

__all__ = ["Storage"]

#: The package's logger: its records are named ``moe_core.storage`` whichever module writes them.
logger = logging.getLogger("moe_core.storage")


class Storage(StorageWriter):
    """The storage root named by a local path or an fsspec URL (``s3://bucket/prefix``, ``memory://x``).

    ``settings`` carries the rest of the config's ``storage`` section (endpoint, region, node cache bound,
    download streams, ``single_writer``); :meth:`from_config` builds one from it.
    """

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
