"""A real S3 endpoint on loopback for tests, benchmarks and trying ``make serve`` on S3: moto's standalone
server (``python -m moto.server``, the way s3fs tests itself; ``pip install .[dev]`` brings it).

    python -m moe_core.local_s3 --port 9000 --bucket moe-demo    # serve until Ctrl-C

It keeps objects in memory and honours conditional writes (If-Match / If-None-Match on PutObject). It
checks no credentials at all: anyone who can reach its port (every user of this host: it listens on
127.0.0.1 only) can read and write every bucket. For a single-user machine, tests and trying things out;
never for real data.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TEST_ENV", "free_port", "local_s3", "make_bucket"]

#: Credentials for the loopback server only (moto accepts any); never real ones.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "moe-test-not-a-secret",
    "AWS_SECRET_ACCESS_KEY": "moe-test-not-a-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_s3(endpoint: str) -> bool:
    """Whether ``endpoint`` answers an S3 call: ListBuckets (``GET /``) with its XML, not merely a
    connection (a port taken by something else, a server still starting, answers no such thing)."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with direct.open(f"{endpoint}/", timeout=2) as resp:
            return resp.status == 200 and b"ListAllMyBucketsResult" in resp.read()
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def local_s3(log: Path, port: int | None = None) -> Iterator[str]:
    """Start moto's S3 server on loopback (a free port unless given); yield its endpoint URL once it
    answers S3 calls; stop it after (killed if it does not stop within 10 s)."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **TEST_ENV),
        )
        try:
            deadline = time.time() + 60
            while not _answers_s3(endpoint):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def make_bucket(endpoint: str, name: str) -> str:
    """Create bucket ``name`` on ``endpoint`` (with the test credentials); return it."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=TEST_ENV["AWS_ACCESS_KEY_ID"],
        secret=TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": endpoint, "region_name": TEST_ENV["AWS_DEFAULT_REGION"]},
        skip_instance_cache=True,
    )
    fs.call_s3("create_bucket", Bucket=name)  # us-east-1: no location constraint
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_core.local_s3", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    p.add_argument("--log", type=Path, default=Path(".cache/local-s3.log"))
    args = p.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server it started too
    with local_s3(args.log, args.port) as endpoint:
        for b in args.bucket:
            make_bucket(endpoint, b)
        print(
            f"S3 endpoint {endpoint} (moto, in memory), buckets {args.bucket}; Ctrl-C or kill stops it",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
