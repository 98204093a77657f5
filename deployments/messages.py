"""What crosses a deployment handle: small frozen values, never dicts read back by string keys.

Ray pickles them between replicas; none holds a model or a Ray object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from deployments.routing import Classification, Decision, RoutingPolicy
from deployments.schemas import Mode
from moe_core.vision import PixelBounds

__all__ = [
    "Answer",
    "Classification",
    "DynamicStats",
    "MergedStatus",
    "Mode",
    "Query",
    "RouteRequest",
    "RouteResult",
]


@dataclass(frozen=True)
class Query:
    """One request as the model deployments get it: validated at the gateway, image still encoded."""

    image: bytes  # the screenshot file, verified readable
    prompt: str
    bounds: PixelBounds  # the pixels the model sees of the image: the config's, narrowed by the request
    image_tokens: int  # what the image costs in the prompt at those bounds, known before any batch
    request_id: str = ""  # Serve's request id (the client's X-Request-Id), for log lines in every hop


@dataclass(frozen=True)
class Answer:
    """One generated answer, from the merged or the dynamic deployment."""

    text: str
    adapter: str | None  # None: the bare base model
    mode: Mode
    version: str | None  # the merged model's or the adapter's version that answered
    batch_size: int  # rows in the forward that generated it
    adapters_in_batch: int  # distinct adapters in that forward
    prompt_tokens: int  # the prompt as the model read it: chat template and image tokens included
    completion_tokens: int


@dataclass(frozen=True)
class RouteRequest:
    """Classify ``image`` with the routing adapter, decide, and answer in place when the decision says dynamic."""

    query: Query
    policy: RoutingPolicy  # the gateway's snapshot: the decision uses its rules and values
    prefer_merged: bool | None = None


@dataclass(frozen=True)
class RouteResult:
    decision: Decision
    answer: Answer | None  # set when the dynamic deployment answered in place (no second hop)


@dataclass(frozen=True)
class MergedStatus:
    adapter: str
    version: str | None  # the published merged version the replica serves; None: nothing published
    ready: bool


@dataclass(frozen=True)
class DynamicStats:
    """Batching and adapter-cache counters of one dynamic replica."""

    pid: int
    forwards: int
    batch_sizes: Mapping[int, int]  # rows in a forward -> forwards
    adapters_per_forward: Mapping[int, int]  # distinct adapters in a forward -> forwards
    max_adapters_in_one_forward: int
    resident: Mapping[str, str]  # adapter -> version, least recently used first
    capacity: int
    loads: int
    evictions: int
    served: tuple[str, ...]
