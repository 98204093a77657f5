"""Shared storage on a real S3 endpoint (moto's standalone server on loopback, tests/s3_server.py):
compare-and-swap by conditional writes, the probe that refuses a store ignoring them, credentials and
endpoint from the AWS environment, and the clean-up of versions a killed writer left half-written."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from moe_core.config import ConfigError, StorageConfig
from moe_core.local_s3 import local_s3
from moe_core.storage.errors import StateConflict, StorageError, StorageUnavailable
from moe_core.storage.store import Storage
from tests.s3_server import Proxy, Request, make_bucket

ROUNDS = 100


def _folder(root: Path, tag: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_model.safetensors").write_bytes(tag.encode() * 512)
    (root / "adapter_config.json").write_text(json.dumps({"tag": tag}))
    return root


def _racer(what: str, settings: str, me: int, versions: list[str], barrier: Any, out: Any) -> None:
    """One writer process: each round, read (the pointer or the state), wait for the other writer to
    have read too, then write expecting what was read. Reports (round, what it read, won)."""
    st = Storage.from_config(StorageConfig.model_validate_json(settings))
    for r in range(ROUNDS):
        if what == "set_current":
            seen: Any = st.current_version("merged", "cal")
        else:
            seen = st.read_state("promotion")[1]
        barrier.wait(timeout=60)
        try:
            if what == "set_current":  # each moves the pointer away from what it read, to its own pick
                st.set_current("merged", "cal", [v for v in versions if v != seen][me], expect=seen)
            else:
                st.write_state("promotion", {"round": r, "by": me}, expect=seen)
            won = True
        except StateConflict:
            won = False
        except StorageError as e:
            if "a newer write won" not in str(e):
                raise
            won = False
        out.put((r, me, seen, won))
        barrier.wait(timeout=60)  # the round is over for both before the next read


@pytest.mark.parametrize("what", ["set_current", "write_state"])
def test_two_writer_processes_racing_exactly_one_wins_every_time(
    s3_settings: StorageConfig, tmp_path: Path, what: str
) -> None:
    """Two processes read the same revision and write at once, 100 times: the store refuses exactly one
    (If-Match on the ETag read; If-None-Match: * for the first state write). Before conditional writes
    this was a read followed by a plain PUT, and both won."""
    st = Storage.from_config(s3_settings)
    versions = [
        st.publish("merged", "cal", _folder(tmp_path / f"v{i}", f"writer-{i}"), make_current=i == 0)
        for i in range(3)
    ]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(what, s3_settings.model_dump_json(), me, versions, barrier, out))
        for me in range(2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(2 * ROUNDS)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rounds: dict[int, list[tuple[int, Any, bool]]] = {}
    for r, me, seen, won in results:
        rounds.setdefault(r, []).append((me, seen, won))
    exactly_one = 0
    for r, rows in sorted(rounds.items()):
        (_, seen_a, won_a), (_, seen_b, won_b) = rows
        assert seen_a == seen_b, f"round {r}: the writers read different revisions"
        exactly_one += won_a + won_b == 1
    print(
        f"{what}: exactly one writer won in {exactly_one} of {ROUNDS} races (2 processes, same revision read)"
    )
    assert exactly_one == ROUNDS
    if what == "write_state":
        data, revision = st.read_state("promotion")
        assert revision == ROUNDS and data["round"] == ROUNDS - 1  # one write per round, none lost
    else:
        ((me, seen),) = [(me, seen) for r, me, seen, won in results if r == ROUNDS - 1 and won]
        assert st.current_version("merged", "cal") == [v for v in versions if v != seen][me]


def test_writes_are_conditional_on_exactly_what_was_read(s3_settings: StorageConfig, tmp_path: Path) -> None:
    """What the store is asked, request by request (the proxy records them): a first write of a pointer or
    a state carries If-None-Match: *, every later one If-Match with exactly the ETag of the GET that read
    the bytes compared. (moto's own check of those headers is not atomic, so the races above could pass
    on it by luck; this does not depend on the server.)"""
    with Proxy(str(s3_settings.endpoint_url)) as proxy:
        st = Storage.from_config(s3_settings.model_copy(update={"endpoint_url": proxy.url}))
        v1, v2 = (
            st.publish("merged", "cal", _folder(tmp_path / t, t), make_current=False) for t in ("a", "b")
        )
        for target, first, then in (
            (
                "state/promotion.json",
                lambda: st.write_state("promotion", {"a": 1}, expect=0),
                lambda: st.write_state("promotion", {"a": 2}, expect=1),
            ),
            (
                "merged/cal/CURRENT",
                lambda: st.set_current("merged", "cal", v1, expect=None),
                lambda: st.set_current("merged", "cal", v2, expect=v1),
            ),
        ):
            proxy.requests.clear()
            first()
            (put,) = proxy.requests_to(target, "PUT")
            assert put.headers.get("if-none-match") == "*" and "if-match" not in put.headers, put.headers
            assert put.status == 200
            proxy.requests.clear()
            then()
            reads = [r for r in proxy.requests_to(target, "GET") if r.status == 200]
            (put,) = proxy.requests_to(target, "PUT")
            assert reads and reads[-1].etag and proxy.requests.index(reads[-1]) < proxy.requests.index(put)
            assert put.headers.get("if-match") == reads[-1].etag and "if-none-match" not in put.headers
            assert put.status == 200


def test_a_store_that_ignores_conditional_writes_is_refused_unless_single_writer(
    s3_settings: StorageConfig, tmp_path: Path
) -> None:
    """A real endpoint that drops If-Match/If-None-Match (a proxy in front of the S3 server): the probe
    write finds out before anything is written, and names the way out."""
    with Proxy(str(s3_settings.endpoint_url)) as proxy:
        proxy.strip_conditions = True
        cfg = s3_settings.model_copy(update={"endpoint_url": proxy.url})
        st = Storage.from_config(cfg)
        with pytest.raises(StorageError, match="does not honour conditional writes") as e:
            st.check_compare_and_swap()
        assert "single_writer: true" in str(e.value)
        with pytest.raises(StorageError, match="does not honour conditional writes"):
            st.write_state("promotion", {}, expect=0)
        with pytest.raises(StorageError, match="does not honour conditional writes"):
            st.publish("merged", "cal", _folder(tmp_path / "a", "a"))
        assert st.read_state("promotion") == ({}, 0)
        single = Storage.from_config(cfg.model_copy(update={"single_writer": True}))
        v = single.publish("merged", "cal", _folder(tmp_path / "b", "b"))
        assert single.current_version("merged", "cal") == v
        assert single.write_state("promotion", {"a": 1}, expect=0) == 1
        with pytest.raises(StateConflict):  # a stale writer is still caught by the read-compare
            single.write_state("promotion", {"a": 2}, expect=0)
    # the same bucket straight on the endpoint: honoured
    Storage.from_config(s3_settings).check_compare_and_swap()


def test_endpoint_region_and_credentials_from_the_aws_environment(
    s3_endpoint: str, s3_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing but the URL in the config: botocore takes endpoint, region and keys from the environment
    (as a Kubernetes Secret provides them)."""
    import s3fs

    bucket = make_bucket(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    s3fs.S3FileSystem.clear_instance_cache()
    st = Storage.from_config(StorageConfig(url=f"s3://{bucket}/root", cache_dir=str(tmp_path / "c")))
    v = st.publish("expert", "cal", _folder(tmp_path / "a", "a"))
    path, got = st.fetch("expert", "cal")
    assert got == v and json.loads((path / "adapter_config.json").read_text()) == {"tag": "a"}
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize(
    ("storage", "words"),
    [
        ({"url": "s3://AKIAXXXX:secret@bucket/p"}, "must not hold credentials"),
        ({"url": "storage", "endpoint_url": "http://127.0.0.1:9000"}, "applies to s3:// URLs only"),
        ({"url": "/mnt/x", "region": "us-east-1"}, "applies to s3:// URLs only"),
        ({"url": "s3://b/p", "endpoint_url": "http://key:secret@host:9000"}, "endpoint_url"),
        ({"url": "s3://b/p", "aws_secret_access_key": "x"}, "aws_secret_access_key"),
        ({"url": "s3://b/p", "download_streams": 0}, "download_streams"),
    ],
)
def test_storage_config_refuses_secrets_and_misplaced_fields(storage: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        StorageConfig.from_dict(storage)


def test_a_version_a_killed_writer_left_without_manifest_is_removed_later(
    s3_settings: StorageConfig, tmp_path: Path
) -> None:
    st = Storage.from_config(s3_settings)
    folder = st.versions_dir("merged", "cal")
    stale, fresh = "v20200101T000000000000-deadbeef", "v29990101T000000000000-cafecafe"
    for v in (stale, fresh):  # files, no manifest: what a writer killed mid-upload leaves
        st.fs.pipe_file(f"{folder}/{v}/model.safetensors", b"partial")
    v = st.publish("merged", "cal", _folder(tmp_path / "a", "a"))
    assert st.versions("merged", "cal") == [v]
    assert not st.fs.exists(f"{folder}/{stale}/model.safetensors")  # over an hour old: removed
    assert st.fs.exists(f"{folder}/{fresh}/model.safetensors")  # maybe a writer still at work: kept


def test_the_s3_demo_config_differs_from_the_default_in_storage_only() -> None:
    """`make serve CONFIG=config/deployment.s3.yaml` serves the same app with its storage on S3."""
    from moe_core.config import DeploymentConfig

    root = Path(__file__).resolve().parents[2] / "config"
    default = DeploymentConfig.from_file(root / "deployment.yaml").model_dump()
    s3 = DeploymentConfig.from_file(root / "deployment.s3.yaml").model_dump()
    assert [k for k in default if default[k] != s3[k]] == ["storage"]
    assert s3["storage"]["url"].startswith("s3://") and s3["storage"]["endpoint_url"]


def _put_to(part: str, status: int, code: str, message: str) -> Any:
    """A proxy answer: PUTs whose path holds ``part`` get the S3 error ``code``."""
    return lambda r: (status, code, message) if r.method == "PUT" and part in r.path else None


def test_write_side_failures_are_storage_errors_that_name_the_path(
    s3_settings: StorageConfig, tmp_path: Path
) -> None:
    """A permission refused, a conditional write that keeps conflicting (409), a probe write refused:
    StorageUnavailable/StateConflict/StorageError naming what was written, never a raw OSError."""
    with Proxy(str(s3_settings.endpoint_url)) as proxy:
        cfg = s3_settings.model_copy(update={"endpoint_url": proxy.url})
        st = Storage.from_config(cfg)
        assert st.write_state("promotion", {}, expect=0) == 1
        proxy.answer = _put_to("state/promotion.json", 403, "AccessDenied", "Access Denied")
        with pytest.raises(StorageUnavailable, match=r"cannot be written: .*state/promotion\.json.*Access"):
            st.write_state("promotion", {"a": 1}, expect=1)
        proxy.answer = _put_to("state/promotion.json", 409, "ConditionalRequestConflict", "in progress")
        with pytest.raises(
            StateConflict,
            match=r"promotion\.json: 6 conditional writes were answered ConditionalRequestConflict",
        ):
            st.write_state("promotion", {"a": 1}, expect=1)
        proxy.answer = _put_to("/experts/", 403, "AccessDenied", "Access Denied")
        with pytest.raises(StorageUnavailable, match=r"cannot be written: .*experts/cal/v.*Access"):
            st.publish("expert", "cal", _folder(tmp_path / "a", "a"))
        proxy.answer = _put_to(".cas-probe-", 403, "AccessDenied", "Access Denied")
        with pytest.raises(StorageError, match=r"probe write to s3://.*\.cas-probe-.*AccessDenied") as e:
            Storage.from_config(cfg).check_compare_and_swap()
        assert "does not honour" not in str(e.value)
        proxy.answer = None
        assert st.read_state("promotion") == ({}, 1)  # nothing was written


def test_a_version_pruned_while_it_is_fetched_is_a_storage_error(tmp_path: Path) -> None:
    """A file of the version gone from the store after its manifest was read (pruned by another
    process): a StorageError naming the version, not a raw FileNotFoundError."""
    st = Storage(f"memory://pruned-{uuid.uuid4().hex}", cache_dir=tmp_path / "node")
    v = st.publish("merged", "cal", _folder(tmp_path / "a", "a"))
    st.fs.rm_file(f"{st.versions_dir('merged', 'cal')}/{v}/adapter_model.safetensors")
    with pytest.raises(StorageError, match=f"version {v}: a file of it is gone from storage"):
        st.fetch("merged", "cal")


def test_a_store_refusing_botocores_checksums_is_named_not_called_unconditional(
    s3_settings: StorageConfig,
) -> None:
    """Some S3-compatible stores answer 400 InvalidArgument to the CRC32 checksum headers botocore sends
    by default: the probe names that error and the setting that avoids it, and with
    request_checksum_calculation: when_required no checksum header is sent and the store is used."""

    def checksummed(r: Request) -> tuple[int, str, str] | None:
        if r.method == "PUT" and any(
            h.startswith(("x-amz-checksum-", "x-amz-sdk-checksum")) for h in r.headers
        ):
            return 400, "InvalidArgument", "x-amz-checksum-crc32 header is not supported"
        return None

    with Proxy(str(s3_settings.endpoint_url)) as proxy:
        proxy.answer = checksummed
        cfg = s3_settings.model_copy(update={"endpoint_url": proxy.url})
        with pytest.raises(StorageError) as e:
            Storage.from_config(cfg).check_compare_and_swap()
        assert "InvalidArgument" in str(e.value) and "x-amz-checksum-crc32" in str(e.value)
        assert "request_checksum_calculation: when_required" in str(e.value)
        assert "does not honour conditional writes" not in str(e.value)
        assert any(r.answered_by_proxy for r in proxy.requests)
        proxy.requests.clear()
        plain = Storage.from_config(cfg.model_copy(update={"request_checksum_calculation": "when_required"}))
        plain.check_compare_and_swap()
        assert plain.write_state("promotion", {"a": 1}, expect=0) == 1
        puts = [r for r in proxy.requests if r.method == "PUT"]
        assert puts and not any(r.answered_by_proxy for r in puts)


def test_the_local_s3_server_is_ready_when_it_answers_s3_not_when_its_port_connects(tmp_path: Path) -> None:
    """Its port already taken by something that is no S3 server: moto cannot start, and the launcher says
    so instead of handing out an endpoint because a TCP connection to the port succeeded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with (
            pytest.raises(RuntimeError, match="moto server did not start"),
            local_s3(tmp_path / "moto.log", port=taken.getsockname()[1]),
        ):
            pass
