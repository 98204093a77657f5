"""A gateway's failures: a deployment call's error as the client sees it, on either API."""

from ray.serve.exceptions import BackPressureError

from deployments.gateway.pipeline import Refused
from deployments.openai_api.errors import ApiError
from deployments.schemas import BadInput

__all__ = ["ServiceUnavailable", "api_error", "first_line", "translated"]


class ServiceUnavailable(RuntimeError):
    """No deployment can answer (503); ``reason`` is a short label for metrics (timeout, error, ...);
    ``overloaded`` (a deployment's queue is full) is a 429 on the /v1 routes."""

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else ""


def translated(e: BaseException) -> BadInput | ServiceUnavailable:
    """What a deployment call raised, as the gateway reports it: the request's own fault (a 4xx found where
    the model is), a full queue, or the callee failing (model missing, replica died, bad adapter)."""
    cause = getattr(e, "cause", e)  # a RayTaskError carries what the deployment raised
    if isinstance(cause, BadInput):
        return cause
    # Serve's full handle queue, or the engine's (moe_core.engine.QueueFull, named here: that module
    # imports torch, which the gateway does not)
    if isinstance(cause, BackPressureError) or type(cause).__name__ == "QueueFull":
        return ServiceUnavailable(f"overloaded: {first_line(cause)}", "overloaded")
    return ServiceUnavailable(f"{type(cause).__name__}: {first_line(cause)}", "error")


def api_error(e: ApiError | BadInput | ServiceUnavailable) -> ApiError:
    """Any failure of a /v1 request in OpenAI's terms."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Refused):  # the pipeline's checks: a 400 (or a 413) naming the field, with its code
        message = e.message if e.message.startswith(e.field) else f"{e.field}: {e.message}"
        return ApiError(400 if e.status == 422 else e.status, message, e.field, e.code)
    if isinstance(e, BadInput):
        return ApiError.of(e)
    if e.reason == "overloaded":
        return ApiError(429, str(e), None, "overloaded")
    return ApiError(503, str(e), None, "timeout" if e.reason == "timeout" else "unavailable")
