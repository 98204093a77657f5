"""A real S3 endpoint on loopback for the tests: moto's standalone server (:mod:`moe_core.local_s3`, the
way s3fs tests itself), and a small HTTP proxy in front of it that counts requests per object and, when
asked, drops the conditional-write headers (a store that does not honour them, like an old S3 clone)."""

from __future__ import annotations

import http.client
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from moe_core import local_s3
from moe_core.local_s3 import TEST_ENV, free_port

__all__ = ["TEST_ENV", "Proxy", "free_port", "make_bucket", "moto_server"]

moto_server = local_s3.local_s3


def make_bucket(endpoint: str, prefix: str = "moe") -> str:
    """A new bucket on ``endpoint``; returns its name."""
    return local_s3.make_bucket(endpoint, f"{prefix}-{uuid.uuid4().hex[:12]}")


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
