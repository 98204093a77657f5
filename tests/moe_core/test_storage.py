from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_core.storage.errors import StorageError
from moe_core.storage.store import Storage


def _folder(root: Path, tag: str, n: int = 3, size: int = 1000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i}.bin.part").write_bytes(f"{tag}-{i}".encode() * size)
    (root / "meta.json").write_text(json.dumps({"tag": tag}))
    return root


def _store(request: pytest.FixtureRequest, tmp_path: Path, url_kind: str) -> Storage:
    """A storage root of each kind: a local folder, memory://, and a bucket on the loopback S3 endpoint."""
    if url_kind == "s3":
        return Storage.from_config(request.getfixturevalue("s3_settings"))
    url = str(tmp_path / "s") if url_kind == "local" else f"memory://moe-test-{time.time_ns()}"
    return Storage(url, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("url_kind", ["local", "memory", "s3"])
def test_publish_fetch_rollback_prune(request: pytest.FixtureRequest, tmp_path: Path, url_kind: str) -> None:
    st = _store(request, tmp_path, url_kind)
    assert st.current_version("merged", "cal") is None
    v1 = st.publish("merged", "cal", _folder(tmp_path / "a", "one"))
    v2 = st.publish("merged", "cal", _folder(tmp_path / "b", "two"))
    assert v1 < v2 and st.current_version("merged", "cal") == v2
    path, version = st.fetch("merged", "cal")
    assert version == v2 and json.loads((path / "meta.json").read_text()) == {"tag": "two"}
    assert st.rollback("merged", "cal") == v1
    path, _ = st.fetch("merged", "cal")
    assert json.loads((path / "meta.json").read_text()) == {"tag": "one"}
    v3 = st.publish("merged", "cal", _folder(tmp_path / "c", "three"), make_current=False)
    assert st.current_version("merged", "cal") == v1  # not current until asked
    assert st.prune("merged", "cal", keep=1) == []  # v2 is newer than current and recent: a writer's, maybe
    assert st.prune("merged", "cal", keep=1, writer_grace_s=0) == [v2]  # the current one (v1) is never pruned
    assert st.versions("merged", "cal") == [v1, v3]
    assert st.names("merged") == ["cal"]
    with pytest.raises(StorageError, match="no complete version"):
        st.set_current("merged", "cal", "v-nope")
    st.check_reachable()


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_dot_names_are_not_published(request: pytest.FixtureRequest, tmp_path: Path, url_kind: str) -> None:
    """A folder cloned from a hub has .gitattributes: never part of a version (the node cache refuses a
    manifest naming a dot-name and removes files a manifest does not name)."""
    st = _store(request, tmp_path, url_kind)
    src = _folder(tmp_path / "a", "one")
    (src / ".gitattributes").write_text("*.bin filter=lfs")
    (src / ".cache").mkdir()
    (src / ".cache" / "x").write_text("x")
    v = st.publish("merged", "cal", src)
    assert sorted(st.manifest("merged", "cal", v)["files"]) == [
        "f0.bin.part",
        "f1.bin.part",
        "f2.bin.part",
        "meta.json",
    ]
    path, _ = st.fetch("merged", "cal")
    assert not (path / ".gitattributes").exists()


def test_a_rollback_never_undoes_a_version_made_current_while_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollback reads CURRENT, picks the version before it, then moves the pointer only if CURRENT still
    names what it read: a newer version made current in between (another writer) stays current."""
    st = Storage(str(tmp_path / "s"), cache_dir=tmp_path / "cache")
    st.publish("merged", "cal", _folder(tmp_path / "a", "one"))
    v2 = st.publish("merged", "cal", _folder(tmp_path / "b", "two"))
    v3 = st.publish("merged", "cal", _folder(tmp_path / "c", "three"), make_current=False)
    versions, raced = st.versions, []

    def racing(kind: str, name: str) -> list[str]:
        """Rollback lists the versions after reading CURRENT: another writer makes v3 current now."""
        out = versions(kind, name)  # type: ignore[arg-type]
        if not raced:
            raced.append(True)
            st.set_current("merged", "cal", v3, expect=v2)
        return out

    monkeypatch.setattr(st, "versions", racing)
    with pytest.raises(StorageError, match=f"current version is {v3}, not {v2}"):
        st.rollback("merged", "cal")
    assert raced and st.current_version("merged", "cal") == v3


@pytest.mark.parametrize("url_kind", ["memory", "s3"])
def test_a_changed_byte_in_a_remote_version_is_refused_on_fetch(
    request: pytest.FixtureRequest, tmp_path: Path, url_kind: str
) -> None:
    """Manifests are verified on fetch from a remote root: a version whose bytes changed after it was
    published is never handed to a replica."""
    st = _store(request, tmp_path, url_kind)
    v = st.publish("merged", "cal", _folder(tmp_path / "a", "one"))
    st.fs.pipe_file(f"{st.versions_dir('merged', 'cal')}/{v}/f1.bin.part", b"tampered")
    with pytest.raises(StorageError, match="does not match manifest"):
        st.fetch("merged", "cal")
    assert not any((st.cache_dir / "versions").glob("*"))  # nothing half-fetched is left to take


def test_versions_dir_refuses_path_traversal(tmp_path: Path) -> None:
    st = Storage(str(tmp_path))
    for bad in ["../x", "a/b", "", ".hidden", "A"]:
        with pytest.raises(ValueError, match="invalid adapter name"):
            st.versions_dir("expert", bad)


KILLED_WRITER = """
import sys, time
from pathlib import Path
from moe_core.storage.store import Storage
st = Storage(sys.argv[1])
def slow(done, total, name):
    print("progress", done, total, name, flush=True)
    time.sleep(0.15)
st.publish("merged", "cal", Path(sys.argv[2]), progress=slow)
print("published", flush=True)
"""


@pytest.mark.parametrize("kill_after_files", [0, 2, 5])
def test_killed_writer_leaves_old_version(tmp_path: Path, kill_after_files: int) -> None:
    """SIGKILL a real publishing process part-way: the old version stays current and complete."""
    st = Storage(str(tmp_path / "s"))
    v1 = st.publish("merged", "cal", _folder(tmp_path / "old", "old"))
    new = _folder(tmp_path / "new", "new", n=8, size=200_000)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "s"), str(new)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen = 0
    while seen < kill_after_files:
        line = proc.stdout.readline()
        assert line.startswith("progress"), line
        seen += 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert st.current_version("merged", "cal") == v1
    assert st.versions("merged", "cal") == [v1]  # no partial version a reader could take
    path, _ = st.fetch("merged", "cal")
    assert json.loads((path / "meta.json").read_text()) == {"tag": "old"}
    # the next writer succeeds despite the leftovers
    v2 = st.publish("merged", "cal", _folder(tmp_path / "n2", "n2"))
    assert st.current_version("merged", "cal") == v2
