"""A real S3 endpoint on loopback for the tests: moto's standalone server (``python -m moto.server``, as
s3fs tests itself), and a small HTTP proxy in front of it that counts requests per object and, when
asked, drops the conditional-write headers (a store that does not honour them, like an old S3 clone)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """Start moto's S3 server on a free loopback port; yield its endpoint URL."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **TEST_ENV),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def make_bucket(endpoint: str, prefix: str = "moe") -> str:
    """A new bucket on ``endpoint``; returns its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=name)
    return name


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": TEST_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": TEST_ENV["AWS_DEFAULT_REGION"],
    }


#: Headers the proxy drops in ``strip_conditions`` mode.
CONDITIONAL = ("if-match", "if-none-match")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class Proxy:
    """An HTTP proxy to ``upstream`` on a free loopback port. ``gets`` counts GET requests per path;
    with ``strip_conditions`` set, If-Match/If-None-Match never reach the upstream."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.gets: Counter[str] = Counter()
        self.strip_conditions = False
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP
                    and not (proxy.strip_conditions and k.lower() in CONDITIONAL)
                }
                if self.command == "GET":
                    with proxy._lock:
                        proxy.gets[self.path.split("?", 1)[0]] += 1
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # no body: the upstream's length describes the object
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets_of(self, key_part: str) -> int:
        """GET requests whose path holds ``key_part`` (a file name, a version)."""
        with self._lock:
            return sum(n for p, n in self.gets.items() if key_part in p)
