"""What crosses a deployment handle: small frozen values, never dicts read back by string keys.

Ray pickles them between replicas; none holds a model or a Ray object.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.routing import Classification, Decision, RoutingPolicy
from deployments.schemas import Mode

__all__ = ["Answer", "Classification", "MergedStatus", "Mode", "RouteRequest", "RouteResult"]


@dataclass(frozen=True)
class Answer:
    """One generated answer, from the merged or the dynamic deployment."""

    text: str
    adapter: str | None  # None: the bare base model
    mode: Mode
    version: str | None  # the merged model's or the adapter's version that answered
    batch_size: int  # rows in the forward that generated it
    adapters_in_batch: int  # distinct adapters in that forward


@dataclass(frozen=True)
class RouteRequest:
    """Classify ``image`` with the routing adapter, decide, and answer in place when the decision says dynamic."""

    image: bytes
    prompt: str
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
