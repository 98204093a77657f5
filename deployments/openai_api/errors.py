"""OpenAI's error shape, on every /v1 error status and as a stream's error event."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from deployments.schemas import BadInput

__all__ = ["ApiError", "ErrorDetail", "ErrorResponse", "validation_error"]

_ERROR_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}
#: /infer's field names, as the OpenAI request names what they stand for.
_PARAMS = {"expert": "model", "image_b64": "messages", "prompt": "messages"}


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, naming the field.")
    type: str = Field(
        description="invalid_request_error, rate_limit_error or server_error, as OpenAI has them."
    )
    param: str | None = Field(description="The request field at fault (dotted path), when one is.")
    code: str | None = Field(description="A short machine-readable reason, e.g. model_not_found.")


class ErrorResponse(BaseModel):
    """OpenAI's error shape, on every /v1 error status and as the error event of a stream."""

    error: ErrorDetail


class ApiError(Exception):
    """A /v1 request that cannot be answered: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def of(cls, e: BadInput) -> ApiError:
        """A :class:`BadInput` from the shared code (routing, deployments): its field as a /v1 param."""
        param = _PARAMS.get(e.field, e.field)
        code = {404: "model_not_found" if param == "model" else "not_found", 413: "too_large"}.get(
            e.status, "invalid_value"
        )
        if e.status == 422 and e.field == "expert" and "below" in e.message:
            code = "below_confidence_threshold"
        return cls(e.status, e.message, param, code)

    @property
    def detail(self) -> ErrorDetail:
        kind = _ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code)

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.detail).model_dump(mode="json")

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=dict(headers or {}))


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as a dotted request path, without its union-member labels."""
    parts: list[str] = []
    for x in loc:
        s = str(x)
        if x == "body" and not parts:
            continue
        if isinstance(x, str) and ("[" in s or s[:1].isupper() or s in {"str", "int", "float", "bool"}):
            continue  # a union member's label (``str``, ``list[tagged-union[...]]``, ``ImageURL``)
        if parts and parts[-1] == s:
            continue  # a tagged union repeats the tag (``image_url.image_url``)
        parts.append(s)
    return ".".join(parts) or None


def validation_error(errors: list[Any]) -> ApiError:
    """FastAPI's request-validation errors as one 400 naming the most specific field, as OpenAI does."""
    if not errors:
        return ApiError(400, "invalid request", None, "invalid_request")
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    located = [(_param(tuple(e.get("loc", ()))), e) for e in errors]
    param = max((p for p, _ in located), key=lambda p: len(p.split(".")) if p else 0)
    msgs = list(dict.fromkeys(str(e.get("msg", "")) for p, e in located if p == param))
    kind = next(str(e.get("type", "")) for p, e in located if p == param)
    code = "missing" if kind == "missing" else "invalid_type" if kind.endswith("_type") else "invalid_value"
    return ApiError(400, f"{param or 'body'}: {', or '.join(msgs)}", param, code)
