"""The node-local weight cache on a real S3 endpoint (moto's server; a counting proxy in front of it): four
replica processes starting together download a version once, a corrupted cached file is found by its
sha256 and fetched again, eviction never removes a version a process uses, and content already on the
node is never downloaded again. Then the cache's own disk, with a local filesystem as the remote side:
what a killed writer leaves is swept, a damaged cached version is rebuilt, bad manifests are refused."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from moe_core.config import StorageConfig
from moe_core.node_cache.cache import NodeCache
from moe_core.node_cache.files import CacheError, content_key
from moe_core.storage.store import Storage
from tests.s3_server import Proxy

ROOT = Path(__file__).resolve().parents[2]
PART = 1 << 20  # 1 MiB parts: the 5 MiB file is fetched as 5 parallel ranged reads


def _version(root: Path, tag: str, big: int = 5 * PART) -> Path:
    """A model-like folder: one large file (several parts), two small ones."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(os.urandom(big))
    (root / "config.json").write_text(json.dumps({"tag": tag}))
    (root / "merge_metadata.json").write_text(json.dumps({"adapter_name": tag}))
    return root


def _settings(s3_settings: StorageConfig, endpoint: str, cache: Path, **kw: object) -> StorageConfig:
    return s3_settings.model_copy(
        update={"endpoint_url": endpoint, "cache_dir": str(cache), "download_part_mb": 1, **kw}
    )


REPLICA = """
import json, sys, time
from pathlib import Path
from moe_core.config import StorageConfig
from moe_core.storage.store import Storage
st = Storage.from_config(StorageConfig.model_validate_json(sys.argv[1]))
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
path, version = st.fetch("merged", "cal")
print(json.dumps({"path": str(path), "stats": dict(st.node_cache.stats)}), flush=True)
sys.stdin.read()  # holds its lease until told to go
"""


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes killed (if still running) and waited for however the test ends: a failed
    assertion must not leave a replica holding its lease, or its pipes, for the rest of the session."""
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)


def _replica(settings: StorageConfig, go: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-c", REPLICA, settings.model_dump_json(), str(go)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_four_replicas_starting_together_download_a_version_once(
    s3_settings: StorageConfig, tmp_path: Path
) -> None:
    src = _version(tmp_path / "v1", "one")
    v = Storage.from_config(s3_settings).publish("merged", "cal", src)
    go = tmp_path / "go"
    with Proxy(str(s3_settings.endpoint_url)) as proxy, _reaped([]) as replicas:
        cfg = _settings(s3_settings, proxy.url, tmp_path / "node")
        replicas.extend(_replica(cfg, go) for _ in range(4))
        for r in replicas:
            assert r.stdout is not None and r.stdout.readline().strip() == "ready"
        go.touch()  # all four fetch at once
        reports = []
        for r in replicas:
            assert r.stdout is not None
            reports.append(json.loads(r.stdout.readline()))
        big_gets = proxy.gets_of(f"{v}/model.safetensors")
        small_gets = proxy.gets_of(f"{v}/config.json") + proxy.gets_of(f"{v}/merge_metadata.json")
        for r in replicas:
            r.communicate("", timeout=30)
    downloads = sum(rep["stats"].get("files_downloaded", 0) for rep in reports)
    fills = sum(rep["stats"].get("fills", 0) for rep in reports)
    hits = sum(rep["stats"].get("hits", 0) for rep in reports)
    print(
        f"node cache: 4 replicas, {fills} download of the version ({downloads} files; GETs at the server: "
        f"{big_gets} ranged parts of the 5 MiB file, {small_gets} for the two small ones), {hits} served "
        "from the node"
    )
    assert (fills, hits, downloads) == (1, 3, 3)
    assert big_gets == 5 and small_gets == 2  # each byte crossed the network once, in 1 MiB parts
    (path,) = {rep["path"] for rep in reports}
    assert (Path(path) / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_a_corrupted_cached_file_is_found_by_its_digest_and_fetched_again(
    s3_settings: StorageConfig, tmp_path: Path
) -> None:
    src = _version(tmp_path / "v1", "one")
    Storage.from_config(s3_settings).publish("merged", "cal", src)
    with Proxy(str(s3_settings.endpoint_url)) as proxy:
        cfg = _settings(s3_settings, proxy.url, tmp_path / "node")
        path, _ = Storage.from_config(cfg).fetch("merged", "cal")
        weights = path / "model.safetensors"
        os.chmod(weights, 0o644)
        data = bytearray(weights.read_bytes())
        data[12345] ^= 0x01  # one flipped bit on the node's disk
        weights.write_bytes(bytes(data))
        (path / "config.json").unlink()  # and a file gone
        gets_before = proxy.gets_of("model.safetensors")
        replica = Storage.from_config(cfg)  # the next replica to start on the node
        again, _ = replica.fetch("merged", "cal")
        gets = proxy.gets_of("model.safetensors") - gets_before
        third = Storage.from_config(cfg)  # (the pointer and the manifest still come from the store)
        third.fetch("merged", "cal")
    assert again == path
    assert replica.node_cache.stats["repairs"] == 2 and replica.node_cache.stats["files_downloaded"] == 2
    assert gets == 5  # the damaged file only, fetched again in full
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (src / name).read_bytes()
    assert third.node_cache.stats["hits"] == 1 and not third.node_cache.stats["files_downloaded"]


HOLDER = """
import sys
from moe_core.config import StorageConfig
from moe_core.storage.store import Storage
st = Storage.from_config(StorageConfig.model_validate_json(sys.argv[1]))
st.fetch("merged", sys.argv[2])
print("holding", flush=True)
sys.stdin.read()
"""


def test_eviction_never_removes_a_version_in_use(s3_settings: StorageConfig, tmp_path: Path) -> None:
    """A bound of 2.5 versions: unused versions go least recently used first; the one a replica process
    holds stays however old, and becomes evictable when that process is killed (its lock goes with it)."""
    publisher = Storage.from_config(s3_settings)
    publisher.publish("merged", "held", _version(tmp_path / "held", "held", big=PART))
    cfg = _settings(
        s3_settings, str(s3_settings.endpoint_url), tmp_path / "node", cache_max_gb=2.5 * PART / 1e9
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, cfg.model_dump_json(), "held"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    with _reaped([holder]):
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        held_key = content_key(
            publisher.manifest("merged", "held", publisher.current_version("merged", "held") or "")["files"]
        )
        versions = tmp_path / "node" / "versions"
        replica = Storage.from_config(cfg)
        keys = []
        for i in range(4):  # a replica moving through four versions of another model
            v = publisher.publish("merged", "cal", _version(tmp_path / f"c{i}", f"c{i}", big=PART))
            path, _ = replica.fetch("merged", "cal")
            keys.append(path.name)
            assert content_key(publisher.manifest("merged", "cal", v)["files"]) == path.name
            time.sleep(0.01)
            present = {p.name for p in versions.iterdir()}
            assert held_key in present, f"the held version was evicted after version {i}"
            assert path.name in present
        assert {p.name for p in versions.iterdir()} == {held_key, keys[-1]}  # c0..c2 evicted, oldest first
        assert replica.node_cache.stats["evicted"] == 3
        holder.kill()  # the replica holding it dies: its flock goes with it
        holder.wait(timeout=30)
    publisher.publish("merged", "cal", _version(tmp_path / "c4", "c4", big=PART))
    path, _ = replica.fetch("merged", "cal")
    # now the held one (least recently used) goes too; c3, released by the replica, still fits the bound
    assert {p.name for p in versions.iterdir()} == {keys[-1], path.name}
    assert not any(
        p.stat().st_nlink == 1 for p in (tmp_path / "node" / "blobs").iterdir()
    )  # no blob left that no version links to


def test_content_already_on_the_node_is_never_downloaded_again(
    s3_settings: StorageConfig, tmp_path: Path
) -> None:
    """Cached by content: the same adapter under another name, or a new version sharing files with one
    on the node, downloads only what the node lacks."""
    st = Storage.from_config(s3_settings)
    src = _version(tmp_path / "a", "a")
    st.publish("expert", "one", src)
    st.publish("expert", "two", src)  # the same files under another name
    (src / "config.json").write_text(json.dumps({"tag": "changed"}))
    st.publish("expert", "three", src)  # one small file changed
    replica = Storage.from_config(_settings(s3_settings, str(s3_settings.endpoint_url), tmp_path / "node"))
    p1, _ = replica.fetch("expert", "one")
    assert replica.node_cache.stats["files_downloaded"] == 3
    p2, _ = replica.fetch("expert", "two")
    assert p2 == p1 and replica.node_cache.stats["files_downloaded"] == 3
    p3, _ = replica.fetch("expert", "three")
    assert p3 != p1 and replica.node_cache.stats["files_downloaded"] == 4
    assert (p3 / "model.safetensors").stat().st_ino == (p1 / "model.safetensors").stat().st_ino


@pytest.mark.parametrize("streams", [1, 4])
def test_ranged_download_single_and_parallel_give_the_same_bytes(
    s3_settings: StorageConfig, tmp_path: Path, streams: int
) -> None:
    st = Storage.from_config(s3_settings)
    src = _version(tmp_path / "a", "a", big=7 * PART + 123)  # parts that do not divide the size
    st.publish("merged", "cal", src)
    replica = Storage.from_config(
        _settings(s3_settings, str(s3_settings.endpoint_url), tmp_path / "node", download_streams=streams)
    )
    path, _ = replica.fetch("merged", "cal")
    assert (path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


# ------------------------------------------------------------------ the node cache's own disk, on its own
def _local_version(root: Path, files: dict[str, bytes]) -> tuple[Any, str, dict[str, Any]]:
    """A version on a local fsspec filesystem (the remote side, without a server) and its manifest."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = {"files": {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}}
    return fsspec.filesystem("file"), str(root), manifest


STALLED_WRITER = """
import json, sys, time
import fsspec
from fsspec.implementations.local import LocalFileSystem
from moe_core.node_cache.cache import NodeCache

class Stalling(LocalFileSystem):
    def cat_file(self, path, start=None, end=None, **kw):
        if path.endswith("z.bin") and start:  # the second part of the big file never comes
            print("stalled", flush=True)
            time.sleep(3600)
        return super().cat_file(path, start=start, end=end, **kw)

NodeCache(sys.argv[1], streams=1, part_bytes=1 << 20).get(Stalling(), sys.argv[2], json.loads(sys.argv[3]))
"""


def test_what_a_killed_writer_left_is_swept_and_does_not_count(tmp_path: Path) -> None:
    """A writer SIGKILLed while it built a version leaves, in tmp/, a half-built folder holding hard links
    to blobs of the node and a partial download: kept while the writer lives (its fill lock is held),
    removed once it is dead, and its links no longer keep blobs that count against the bound."""
    node = tmp_path / "node"
    shared = os.urandom(1000)
    fs, one, m1 = _local_version(tmp_path / "one", {"a.txt": shared})
    _, two, m2 = _local_version(tmp_path / "two", {"a.txt": shared, "z.bin": os.urandom(2 << 20)})
    NodeCache(node).get(fs, one, m1).release()  # a.txt's blob is on the node
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITER, str(node), two, json.dumps(m2)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    with _reaped([writer]):
        assert writer.stdout is not None and writer.stdout.readline().strip() == "stalled"
        left = sorted(p.name for p in (node / "tmp").iterdir())
        assert len(left) == 2, left  # the half-built version (a.txt linked in) and z.bin's first part
        blob = node / "blobs" / m1["files"]["a.txt"]
        assert blob.stat().st_nlink == 3  # the blob, version one, the half-built version two
        NodeCache(node).evict()
        assert sorted(p.name for p in (node / "tmp").iterdir()) == left  # a live writer's: kept
        writer.kill()  # SIGKILL: nothing of it runs again
    cache = NodeCache(node, max_bytes=0)  # nothing in use: everything may go
    cache.evict()
    assert not any((node / "tmp").iterdir())
    assert not any((node / "blobs").iterdir()), "a blob only a dead writer's leftover linked to was kept"
    assert cache.stats["evicted"] == 1
    lease = NodeCache(node).get(fs, two, m2)  # and version two is built from nothing
    assert (lease.path / "z.bin").read_bytes() == (Path(two) / "z.bin").read_bytes()
    lease.release()


def test_a_cached_version_without_its_manifest_or_with_stray_files_is_rebuilt(tmp_path: Path) -> None:
    """A version on the node that lost MANIFEST.json (a damaged disk) used to fail every fetch with
    ENOTEMPTY: it is moved aside and built again when nobody uses it, repaired in place when a process
    does; files the manifest does not name are removed, as a volume root refuses them."""
    node = tmp_path / "node"
    fs, one, m1 = _local_version(tmp_path / "one", {"a.txt": b"a" * 100, "sub/b.bin": b"b" * 100})
    first = NodeCache(node).get(fs, one, m1)
    entry = first.path
    first.release()
    (entry / "MANIFEST.json").unlink()
    again = NodeCache(node)
    lease = again.get(fs, one, m1)  # nobody uses it: moved aside, built again (from the node's blobs)
    assert lease.path == entry and json.loads((entry / "MANIFEST.json").read_text()) == m1
    assert again.stats["fills"] == 1 and not again.stats["files_downloaded"]
    (entry / "MANIFEST.json").unlink()  # now while `lease` holds it: repaired in place
    (entry / "stray.bin").write_bytes(b"x")
    (entry / "sub" / ".link-0000").write_bytes(b"x")
    third = NodeCache(node)
    third.get(fs, one, m1).release()
    assert third.stats["repairs"] == 1 and not third.stats["fills"]
    assert json.loads((entry / "MANIFEST.json").read_text()) == m1
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()) == [
        "MANIFEST.json",
        "a.txt",
        "sub/b.bin",
    ]
    lease.release()
    (entry / "extra.txt").write_bytes(b"x")  # a stray file alone: no hit, removed
    fourth = NodeCache(node)
    fourth.get(fs, one, m1).release()
    assert not (entry / "extra.txt").exists() and not fourth.stats["hits"]


@pytest.mark.parametrize(
    "files",
    [
        {"a.txt": "A" * 64},  # not lower-case hex
        {"a.txt": "g" * 64},
        {"a.txt": "a" * 63},
        {"MANIFEST.json": "a" * 64},  # would be written through a link to a blob
        {".hidden": "a" * 64},
        {"sub/.git/x": "a" * 64},
        {"../x": "a" * 64},
        {"/etc/x": "a" * 64},
        {"a//b": "a" * 64},  # not written as it would be found
        {"./a": "a" * 64},
    ],
)
def test_a_manifest_naming_anything_but_plain_files_and_sha256s_is_refused(
    tmp_path: Path, files: dict[str, str]
) -> None:
    with pytest.raises(CacheError, match="is not a file and sha256"):
        NodeCache(tmp_path / "node").get(fsspec.filesystem("file"), str(tmp_path), {"files": files})
