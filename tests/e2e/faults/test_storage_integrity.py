"""Storage integrity (hardening issue, items 7 and 11): what is served is what was published, and an
older writer never replaces a newer one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from moe_core.storage.errors import StorageError
from moe_core.storage.store import Storage


def _folder(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(tag.encode() * 64)
    (path / "adapter_config.json").write_text(json.dumps({"tag": tag}))
    return path


def test_a_changed_byte_in_a_published_version_is_refused_on_read(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "s"))
    v = st.publish("expert", "calendar", _folder(tmp_path / "a", "one"))
    path, _ = st.fetch("expert", "calendar")
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="does not match manifest"):
        st.fetch("expert", "calendar", v)


def test_a_file_added_to_a_published_version_is_refused_on_read(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "s"))
    st.publish("expert", "calendar", _folder(tmp_path / "a", "one"))
    path, _ = st.fetch("expert", "calendar")
    (path / "adapter_model.bin").write_bytes(b"pickle")  # something the manifest never listed
    with pytest.raises(StorageError, match="extra"):
        st.fetch("expert", "calendar")


def test_an_older_writer_finishing_last_does_not_win(tmp_path: Path) -> None:
    """Two merges start from the same current version; the second to finish is refused."""
    st = Storage(str(tmp_path / "s"))
    v0 = st.publish("merged", "calendar", _folder(tmp_path / "a", "zero"))
    newer = st.publish("merged", "calendar", _folder(tmp_path / "b", "new"), expect=v0)
    with pytest.raises(StorageError, match="a newer write won"):
        st.publish("merged", "calendar", _folder(tmp_path / "c", "old"), expect=v0)
    assert st.current_version("merged", "calendar") == newer


def test_prune_keeps_what_readers_and_writers_may_still_use(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "s"))
    vs = [st.publish("merged", "calendar", _folder(tmp_path / f"f{i}", str(i))) for i in range(4)]
    pending = st.publish("merged", "calendar", _folder(tmp_path / "p", "p"), make_current=False)
    time.sleep(0.01)
    pruned = st.prune("merged", "calendar", keep=1)
    # the current one, the one current just before it (a replica may be loading it) and a writer's
    # new version (not current yet) all stay
    assert pruned == vs[:2]
    assert st.versions("merged", "calendar") == [vs[2], vs[3], pending]
