"""A real S3 endpoint on loopback for the tests: moto's standalone server (:mod:`moe_core.local_s3`, the
way s3fs tests itself), and a small HTTP proxy in front of it that counts requests per object, records
what each request sent, when asked drops the conditional-write headers (a store that does not honour
them, like an old S3 clone) or answers requests itself (an S3 error a store gives), and can be stopped
with its connections (an endpoint gone)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from moe_core import local_s3
from moe_core.local_s3 import TEST_ENV, free_port

__all__ = ["TEST_ENV", "Proxy", "Request", "free_port", "make_bucket", "moto_server", "s3_error"]

moto_server = local_s3.local_s3


def make_bucket(endpoint: str, prefix: str = "moe") -> str:
    """A new bucket on ``endpoint``; returns its name."""
    return local_s3.make_bucket(endpoint, f"{prefix}-{uuid.uuid4().hex[:12]}")


#: Headers the proxy drops in ``strip_conditions`` mode.
CONDITIONAL = ("if-match", "if-none-match")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Request:
    """One request as the proxy saw it: headers (lower-case names) and the status it was answered with;
    ``etag`` is the ETag header of the answer."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    etag: str | None = None
    answered_by_proxy: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


#: ``Proxy.answer``: given a request, the (status, S3 error code, message) to answer it with instead of
#: forwarding it, or None to forward it.
Answer = Callable[[Request], tuple[int, str, str] | None]


def s3_error(status: int, code: str, message: str) -> bytes:
    """An S3 error document, as a store sends one."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>proxy</RequestId></Error>"
    ).encode()


class Proxy:
    """An HTTP proxy to ``upstream`` on a free loopback port. ``gets`` counts GET requests per path;
    ``requests`` records every request; with ``strip_conditions`` set, If-Match/If-None-Match never
    reach the upstream; ``answer`` may answer a request with an S3 error instead; :meth:`stop` closes
    the port and every open connection (the endpoint is gone)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.gets: Counter[str] = Counter()
        self.requests: list[Request] = []
        self.strip_conditions = False
        self.answer: Answer | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopped = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                super().finish()

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                seen = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                with proxy._lock:
                    proxy.requests.append(seen)
                    if self.command == "GET":
                        proxy.gets[self.path.split("?", 1)[0]] += 1
                canned = proxy.answer(seen) if proxy.answer is not None else None
                if canned is not None:
                    status, code, message = canned
                    seen.status, seen.answered_by_proxy = status, True
                    data = s3_error(status, code, message)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP
                    and not (proxy.strip_conditions and k.lower() in CONDITIONAL)
                }
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                seen.status, seen.etag = resp.status, resp.getheader("ETag")
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
        self.stop()

    def stop(self) -> None:
        """Stop listening and cut every open connection: new ones are refused (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def gets_of(self, key_part: str) -> int:
        """GET requests whose path holds ``key_part`` (a file name, a version)."""
        with self._lock:
            return sum(n for p, n in self.gets.items() if key_part in p)

    def requests_to(self, key_part: str, method: str | None = None) -> list[Request]:
        """The requests whose path holds ``key_part`` (of ``method`` when given), in order."""
        with self._lock:
            return [r for r in self.requests if key_part in r.path and (method is None or r.method == method)]
