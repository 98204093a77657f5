"""The node-local weight cache on a real S3 endpoint (moto's server; a counting proxy in front of it): four
replica processes starting together download a version once, a corrupted cached file is found by its
sha256 and fetched again, eviction never removes a version a process uses, and content already on the
node is never downloaded again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_core.config import StorageConfig
from moe_core.node_cache import content_key
from moe_core.storage import Storage
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
from moe_core.storage import Storage
st = Storage.from_config(StorageConfig.model_validate_json(sys.argv[1]))
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
path, version = st.fetch("merged", "cal")
print(json.dumps({"path": str(path), "stats": dict(st.node_cache.stats)}), flush=True)
sys.stdin.read()  # holds its lease until told to go
"""


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
    with Proxy(str(s3_settings.endpoint_url)) as proxy:
        cfg = _settings(s3_settings, proxy.url, tmp_path / "node")
        replicas = [_replica(cfg, go) for _ in range(4)]
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
from moe_core.storage import Storage
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
