"""``/v1/models``: the base model, the expert adapters, the further full models (with their own limits)
and the routed model, and what a request's ``model`` names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from deployments.openai_api.errors import ApiError
from deployments.routing import RoutingPolicy
from deployments.settings import GatewaySettings

__all__ = [
    "ModelCard",
    "ModelChoice",
    "ModelList",
    "model_list",
    "public_storage_root",
    "resolve_model",
    "routing_available",
]

OWNED_BY = "moe-inference-server"


class ModelCard(BaseModel):
    """One model of ``/v1/models``: the base, an expert adapter (parent: the base), a further full model
    (with its own limits), or the routed model."""

    id: str = Field(description="What to send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the gateway started serving it.")
    owned_by: str = OWNED_BY
    root: str = Field(
        description="Where it comes from: the base model's id, or the adapter's storage folder."
    )
    parent: str | None = Field(
        default=None, description="The base model's id, for adapters and the routed model."
    )
    # a further full model's own limits (the others answer within the server's); vLLM names the first
    max_model_len: int | None = Field(
        default=None, description="A further full model's longest prompt in tokens, its images' included."
    )
    max_completion_tokens: int | None = Field(
        default=None, description="A further full model's limit on `max_tokens`."
    )
    min_pixels: int | None = Field(default=None, description="A further full model's fewest image pixels.")
    max_pixels: int | None = Field(default=None, description="A further full model's most image pixels.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class ModelChoice:
    """What a request's ``model`` names: an expert adapter, the bare base model, or routing."""

    kind: Literal["adapter", "base", "routed"]
    adapter: str | None = None


def routing_available(policy: RoutingPolicy, settings: GatewaySettings, dynamic: bool) -> bool:
    """The routed model exists when a routing adapter, its labels and the dynamic deployment do."""
    return dynamic and settings.router is not None and bool(policy.labels)


def public_storage_root(url: str) -> str:
    """The storage root as clients see it: a URL's scheme only (``s3://<storage>``: the bucket and
    prefix are the operator's, not the API's), a path as it is configured."""
    scheme, sep, _ = url.partition("://")
    return f"{scheme}://<storage>" if sep else url.rstrip("/")


def model_list(policy: RoutingPolicy, settings: GatewaySettings, routed: bool, created: int) -> ModelList:
    """The base, every expert the live policy serves (adapters published later appear as the live
    config names them), and the routed model when routing is available."""
    base = settings.base_model_name
    root = public_storage_root(settings.storage.url)
    cards = [ModelCard(id=base, created=created, root=settings.base_model_id)]
    cards += [
        ModelCard(id=name, created=created, root=f"{root}/experts/{name}", parent=base)
        for name in sorted(policy.experts - set(settings.models))
    ]
    cards += [
        ModelCard(
            id=name,
            created=created,
            root=m.checkpoint or f"{root}/merged/{name}",
            max_model_len=m.limits.max_prompt_tokens,
            max_completion_tokens=m.limits.max_completion_tokens,
            min_pixels=m.limits.min_pixels,
            max_pixels=m.limits.max_pixels,
        )
        for name, m in sorted(settings.models.items())
    ]
    if routed:
        cards.append(
            ModelCard(
                id=settings.api.routed_model_name,
                created=created,
                root=f"{root}/router/{settings.router}",
                parent=base,
            )
        )
    return ModelList(data=cards)


def resolve_model(model: str, policy: RoutingPolicy, settings: GatewaySettings, routed: bool) -> ModelChoice:
    """``model`` to what answers; an unknown name is a 404 listing the known ones."""
    if model == settings.api.routed_model_name and routed:
        return ModelChoice("routed")
    if model == settings.base_model_name:
        return ModelChoice("base")
    if model in policy.experts:
        return ModelChoice("adapter", model)
    known = [c.id for c in model_list(policy, settings, routed, 0).data]
    raise ApiError(404, f"model {model[:80]!r} does not exist; known: {known}", "model", "model_not_found")
