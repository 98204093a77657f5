"""HTTP request/response models and input validation for the router (no Ray imports)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.errors import BadInput
from deployments.openai_api.outputs import StructuredFields
from deployments.routing import Mode, RoutedVia

__all__ = [
    "AdapterStatus",
    "BadInput",
    "ImageInfo",
    "InferRequest",
    "InferResponse",
    "Usage",
    "error_body",
]


class InferRequest(StructuredFields):
    """``/infer``: a screenshot and an instruction; ``response_format``, ``structured_outputs`` or
    ``guided_*`` constrain the answer as on ``/v1/chat/completions``."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str = Field(description="Screenshot as base64 or a data URL (data:image/png;base64,...).")
    prompt: str = Field(description="The instruction for the expert, e.g. 'Click the Save button'.")
    expert: int | str | None = Field(
        default=None, description="Router label id or adapter name; omitted: the routing adapter decides."
    )
    prefer_merged: bool | None = Field(
        default=None, description="Override the config's gateway.prefer_merged for this request."
    )
    # the request's own bounds, within the config's limits.min_pixels/max_pixels (same shape, other fields)
    min_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Qwen's per-image min_pixels: fewest pixels the model sees of the image, within the "
        "configured limits.min_pixels..max_pixels.",
    )
    max_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Qwen's per-image max_pixels: most pixels the model sees of the image, within the configured "
        "limits (fewer pixels: fewer image tokens, a faster answer, coarser detail).",
    )
    logprobs: bool | None = Field(
        default=None, description="Report each answer token's log probability (answer_logprob: their sum)."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") parses from JSON but is not text
            raise ValueError(f"prompt is not valid unicode ({e.reason} at position {e.start})") from e
        return v


class ImageInfo(BaseModel):
    """The size the model saw: an action's coordinates refer to model_width x model_height; scale by
    width / model_width and height / model_height to map them back to the screenshot's pixels."""

    width: int = Field(description="The screenshot's width as sent.")
    height: int = Field(description="The screenshot's height as sent.")
    model_width: int = Field(description="Width after Qwen's aspect-preserving resize, as the model saw it.")
    model_height: int = Field(description="Height after that resize.")
    tokens: int = Field(description="Image tokens in the prompt: (model_width / 32) * (model_height / 32).")


class Usage(BaseModel):
    """``/infer``'s usage: flat, with the image's tokens and the cached ones beside the counts. The chat
    API's :class:`~deployments.openai_api.responses.CompletionUsage` counts the same tokens in OpenAI's
    shape (``prompt_tokens_details``); the two stay apart because their JSON differs on the wire."""

    prompt_tokens: int = Field(description="Prompt tokens as the model read them: template, text and image.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")
    image_tokens: int = Field(description="The image's share of prompt_tokens.")
    cached_tokens: int = Field(default=0, description="Prompt tokens whose KV came from the prefix cache.")


class TokenLogprobInfo(BaseModel):
    token: str = Field(description="The token as text.")
    logprob: float = Field(description="Its log probability under the model (before any grammar mask).")


class InferResponse(BaseModel):
    request_id: str = Field(
        description="This request's id: the client's X-Request-Id when it sent one (also the response header)."
    )
    task_output: str = Field(description="The expert's answer (one action).")
    adapter: str | None = Field(description="Adapter that answered; null for the bare base model.")
    mode: Mode = Field(description="Which deployment generated the answer.")
    routed_via: RoutedVia = Field(description="How the adapter was chosen.")
    confidence: float | None = Field(description="Routing confidence (null when the expert was explicit).")
    merged_version: str | None = Field(default=None, description="Merged model version, when mode is merged.")
    fallback: bool = Field(
        default=False, description="True when the merged deployment failed and dynamic answered."
    )
    batch_size: int | None = Field(
        default=None, description="Rows in the forward that generated this answer."
    )
    adapters_in_batch: int | None = Field(default=None, description="Distinct adapters in that forward.")
    image: ImageInfo = Field(description="The screenshot's size and the size the model saw it at.")
    usage: Usage = Field(description="Tokens read and generated.")
    logprobs: list[TokenLogprobInfo] | None = Field(
        default=None, description="With logprobs: each answer token and its log probability (raw model)."
    )
    answer_logprob: float | None = Field(
        default=None,
        description="With logprobs: the answer's log probability (their sum); exp() of it is a confidence.",
    )


class AdapterStatus(BaseModel):
    name: str
    merged: bool = Field(description="Has an enabled merged deployment of its own (pinned in the config).")
    serving: Literal["pinned", "promoted", "dynamic"] = Field(
        description="Who answers it: its own merged deployment, a promotion slot, or the dynamic deployment."
    )
    slot: int | None = Field(default=None, description="The promotion slot serving it, when promoted.")
    merged_version: str | None = Field(description="Published merged version the deployment serves.")
    dynamic: bool = Field(description="Served by the dynamic-LoRA deployment.")
    router_labels: list[int] = Field(description="Router labels that select it.")


def error_body(field: str, message: str, request_id: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"field": field, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body
