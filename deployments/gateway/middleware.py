"""The gateway's ASGI middlewares: API keys, and the bound on a request's body.

They hold no state of their own: the app that installs them (:mod:`deployments.gateway.api`) passes each
the same :class:`GuardSettings`, which the gateway fills in when a replica starts (the keys and the limit
come from the config, known only then).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.openai_api.errors import ApiError
from deployments.schemas import error_body
from moe_core.config import ApiConfig, ConfigError

__all__ = ["OPEN_PATHS", "ApiKeyMiddleware", "ApiKeys", "BodyLimitMiddleware", "GuardSettings", "OnRefused"]

#: The logger of the key-file warnings (named for the OpenAI-compatible API, whose section sets the keys).
logger = logging.getLogger("deployments.openai_api")

#: Paths that never need a key: liveness and the API's own description.
OPEN_PATHS = frozenset(
    {"/healthz", "/health", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)


class ApiKeys:
    """The accepted API keys: ``api.key_env``'s value and ``api.key_file``'s lines (re-read when the file
    changes, so a rotated Kubernetes Secret applies without a restart). Compared in constant time."""

    def __init__(self, env: str | None, file: str | None) -> None:
        self.env, self.file = env, file
        self._stamp: tuple[int, int] | None = None
        self._file_keys: tuple[bytes, ...] = ()
        if not self.keys():
            raise ConfigError(
                f"api: no API key found (api.key_env {env!r}: "
                f"{'set' if env and os.environ.get(env) else 'unset or empty'}; api.key_file {file!r}: "
                f"{'no key in it' if file and Path(file).is_file() else 'missing'}); set one, or unset both "
                "to serve without keys"
            )

    @classmethod
    def of(cls, api: ApiConfig) -> ApiKeys | None:
        return cls(api.key_env, api.key_file) if api.keys_required else None

    def keys(self) -> tuple[bytes, ...]:
        env = os.environ.get(self.env, "").strip() if self.env else ""
        return ((env.encode(),) if env else ()) + self._read_file()

    def _read_file(self) -> tuple[bytes, ...]:
        if self.file is None:
            return ()
        try:
            st = os.stat(self.file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                lines = Path(self.file).read_text().splitlines()
                self._file_keys = tuple(
                    s.encode() for s in (x.strip() for x in lines) if s and not s.startswith("#")
                )
                self._stamp = stamp
        except OSError as e:  # a missing file holds no key: fail closed
            logger.warning("api: cannot read api.key_file %s: %s", self.file, e)
            self._stamp, self._file_keys = None, ()
        return self._file_keys

    def accepts(self, authorization: str | None) -> bool:
        """``Authorization: Bearer <key>`` with one of the keys."""
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        ok = False
        for key in self.keys():
            ok |= hmac.compare_digest(given, key)  # no early exit: every key is compared
        return ok


#: Called with (path, status) for each request a middleware refuses (the gateway's metrics).
OnRefused = Callable[[str, int], None]


@dataclass
class GuardSettings:
    """What the middlewares enforce, shared by both: unset (None), they let every request through."""

    #: The accepted API keys (:meth:`ApiKeys.of` the config's ``api`` section); None: no keys needed.
    keys: ApiKeys | None = None
    #: The largest request body read (``limits.max_body_bytes``); None: no bound.
    max_body_bytes: int | None = None
    #: Told of each refusal (the gateway's metrics).
    on_refused: OnRefused | None = None

    def refused(self, path: str, status: int) -> None:
        if self.on_refused is not None:
            self.on_refused(path, status)


class _Guard:
    """An ASGI middleware configured by the app with a function that returns the replica's
    :class:`GuardSettings`, called at each request (see :func:`deployments.gateway.api.guards`)."""

    def __init__(self, app: ASGIApp, settings: Callable[[], GuardSettings]) -> None:
        self.app = app
        self.settings = settings


class ApiKeyMiddleware(_Guard):
    """ASGI middleware: with keys on, every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer``;
    a refusal is a 401 before the body is read (OpenAI's shape under /v1, ``/infer``'s elsewhere)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guards = self.settings()
        keys = guards.keys
        if scope["type"] != "http" or keys is None:
            await self.app(scope, receive, send)
            return
        root, path = scope.get("root_path", ""), scope.get("path", "")
        path = path[len(root) :] if root and path.startswith(root) else path
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if keys.accepts(header):
            await self.app(scope, receive, send)
            return
        message = "missing or wrong API key: send Authorization: Bearer <key>"
        if path.startswith("/v1/"):
            response = ApiError(401, message, None, "invalid_api_key").response()
        else:
            response = JSONResponse(status_code=401, content=error_body("authorization", message))
        response.headers["WWW-Authenticate"] = "Bearer"
        guards.refused(path, 401)
        await response(scope, receive, send)


class BodyLimitMiddleware(_Guard):
    """ASGI middleware: a body over ``limits.max_body_bytes`` is refused with a 413 before it is read
    whole (by its Content-Length, or while it streams in when it has none), so no request can push the
    gateway out of memory."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guards = self.settings()
        limit = guards.max_body_bytes
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._too_large(path, limit)(scope, receive, send)
            return
        seen, refused = 0, False

        async def counted() -> Message:
            """The body as it streams in; past the limit, the client gets the 413 and the app a disconnect."""
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    await self._too_large(path, limit)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:  # the app's own answer to a body it never got whole is dropped
                await send(message)

        await self.app(scope, counted, guarded)

    def _too_large(self, path: str, limit: int) -> JSONResponse:
        message = f"request body is over the limit of {limit} bytes (limits.max_body_bytes)"
        self.settings().refused(path, 413)
        if "/v1/" in path:
            return ApiError(413, message, None, "too_large").response()
        return JSONResponse(status_code=413, content=error_body("body", message))
