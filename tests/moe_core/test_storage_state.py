"""Small durable state with compare-and-swap: of two writers that read the same revision, one wins."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from moe_core.storage.errors import StateConflict, StorageError
from moe_core.storage.store import Storage


def _store(request: pytest.FixtureRequest, tmp_path: Path, url_kind: str) -> Storage:
    if url_kind == "s3":  # a bucket on the loopback S3 endpoint (moto's server)
        return Storage.from_config(request.getfixturevalue("s3_settings"))
    url = str(tmp_path / "s") if url_kind == "local" else f"memory://moe-state-{time.time_ns()}"
    return Storage(url, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("url_kind", ["local", "memory", "s3"])
def test_read_write_and_compare_and_swap(
    request: pytest.FixtureRequest, tmp_path: Path, url_kind: str
) -> None:
    st = _store(request, tmp_path, url_kind)
    assert st.read_state("promotion") == ({}, 0)
    assert st.write_state("promotion", {"slots": [None]}, expect=0) == 1
    assert st.write_state("promotion", {"slots": ["calendar"]}, expect=1) == 2
    assert st.read_state("promotion") == ({"slots": ["calendar"]}, 2)
    with pytest.raises(StateConflict, match="revision 2, not 1"):
        st.write_state("promotion", {"slots": []}, expect=1)
    with pytest.raises(StateConflict, match="revision 2, not 0"):
        st.write_state("promotion", {}, expect=0)
    assert st.read_state("promotion") == ({"slots": ["calendar"]}, 2)  # the losers changed nothing
    assert st.read_state("other") == ({}, 0)  # states are independent
    raw = json.loads(st.fs.cat_file(st.state_path("promotion")))
    # each write names its writer (a retried request that won is told from a lost race by it)
    assert raw == {"revision": 2, "data": {"slots": ["calendar"]}, "writer": raw["writer"]}
    assert len(raw["writer"]) == 32
    assert st.state_path("promotion") == f"{st.root}/state/promotion.json"


@pytest.mark.parametrize("url_kind", ["local", "memory", "s3"])
def test_writers_that_read_the_same_revision_one_wins(
    request: pytest.FixtureRequest, tmp_path: Path, url_kind: str
) -> None:
    st = _store(request, tmp_path, url_kind)
    st.write_state("promotion", {"by": "setup"}, expect=0)
    other = Storage(st.url, cache_dir=tmp_path / "cache2", settings=st.settings)  # a second process's view
    _, rev_a = st.read_state("promotion")
    _, rev_b = other.read_state("promotion")
    assert st.write_state("promotion", {"by": "a"}, expect=rev_a) == 2
    with pytest.raises(StateConflict):
        other.write_state("promotion", {"by": "b"}, expect=rev_b)
    assert other.read_state("promotion") == ({"by": "a"}, 2)


def test_concurrent_local_writers_exactly_one_wins(tmp_path: Path) -> None:
    """Racing threads, each with its own Storage: the lock file makes read-compare-write one step."""
    root = str(tmp_path / "s")
    n = 8
    barrier = threading.Barrier(n)
    won: list[int] = []
    lost: list[int] = []

    def writer(i: int) -> None:
        st = Storage(root)
        barrier.wait()
        try:
            st.write_state("promotion", {"by": i}, expect=0)
            won.append(i)
        except StateConflict:
            lost.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(won) == 1 and len(lost) == n - 1
    assert Storage(root).read_state("promotion") == ({"by": won[0]}, 1)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "A"])
def test_state_names_are_validated(tmp_path: Path, bad: str) -> None:
    st = Storage(str(tmp_path))
    with pytest.raises(ValueError, match="invalid adapter name"):
        st.read_state(bad)
    with pytest.raises(ValueError, match="invalid adapter name"):
        st.write_state(bad, {}, expect=0)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not json", "state is not JSON"),
        (b'{"revision": 0, "data": {}}', "expected a revision >= 1"),
        (b'{"revision": true, "data": {}}', "expected a revision >= 1"),
        (b'{"revision": 1, "data": []}', "expected an object under 'data'"),
        (b"[1, 2]", "expected a revision >= 1"),
    ],
)
def test_corrupt_state_is_refused_naming_the_file(tmp_path: Path, content: bytes, words: str) -> None:
    st = Storage(str(tmp_path))
    path = Path(st.state_path("promotion"))
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(StorageError, match=words) as e:
        st.read_state("promotion")
    assert "promotion.json" in str(e.value)


def test_write_refuses_data_that_is_not_a_dict(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected a dict, got list"):
        Storage(str(tmp_path)).write_state("promotion", [], expect=0)  # type: ignore[arg-type]
