"""The routing rules, free of Ray: which adapter answers, and which deployment serves it.

Pure values and functions, unit-tested as tables; the gateway and the dynamic deployment only carry
out what :func:`decide` returns.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from deployments.errors import BadInput
from moe_core.answers import Classification
from moe_core.config import GatewayLive

__all__ = ["Classification", "Decision", "Mode", "RoutedVia", "RoutingPolicy", "decide"]

#: Which deployment serves a request (the routing decision's target) and so generated its answer.
Mode = Literal["merged", "dynamic"]
#: How the adapter was chosen: named by the client, by the routing adapter, or the base model below threshold.
RoutedVia = Literal["explicit", "router", "router-below-threshold"]


@dataclass(frozen=True)
class RoutingPolicy:
    labels: Mapping[int, str]  # router label id -> adapter name
    merged: Collection[str]  # adapters with an enabled merged deployment
    live: GatewayLive
    merged_disabled: Collection[str] = ()  # merged adapters whose deployment is disabled: dynamic serves them
    models: Collection[
        str
    ] = ()  # further full models (config ``models``): only their own deployment serves them

    @property
    def experts(self) -> set[str]:
        """Every name a request may ask for: the expert adapters and the further full models."""
        return (
            set(self.merged) | set(self.merged_disabled) | set(self.live.dynamic_adapters) | set(self.models)
        )

    def resolve_expert(self, expert: int | str) -> str:
        """An explicit expert: a router label id or an adapter name."""
        if isinstance(expert, bool):  # bool is an int in Python; never a label
            raise BadInput("expert", f"expected a label id or an adapter name, got {expert!r}")
        if isinstance(expert, str) and expert.isascii() and expert.isdecimal() and len(expert) > 9:
            raise BadInput("expert", f"unknown router label {expert[:12]}...; known: {sorted(self.labels)}")
        if isinstance(expert, int) or (isinstance(expert, str) and expert.isascii() and expert.isdecimal()):
            label = int(expert)  # ASCII digits only: "²" is a digit to str.isdigit, not to int()
            if label not in self.labels:
                raise BadInput("expert", f"unknown router label {label}; known: {sorted(self.labels)}")
            name = self.labels[label]
        else:
            name = expert
        if name not in self.experts:
            raise BadInput("expert", f"unknown expert {name!r}; known: {sorted(self.experts)}", 404)
        return name

    def target(self, adapter: str | None, prefer_merged: bool | None) -> Mode:
        """Merged when the adapter has an enabled merged deployment and merged is preferred; a further full
        model always answers from its own deployment (the merged machinery's)."""
        if adapter is not None and adapter in self.models:
            return "merged"
        prefer = self.live.prefer_merged if prefer_merged is None else prefer_merged
        return "merged" if adapter is not None and prefer and adapter in self.merged else "dynamic"

    def label_names(self) -> list[str]:
        return [self.labels[k] for k in sorted(self.labels)]


@dataclass(frozen=True)
class Decision:
    """What to do with a routed request: answer with ``adapter`` (None: the base model) on ``target``,
    or reject it (below the confidence threshold with ``below_threshold: reject``)."""

    action: Literal["answer", "reject"]
    adapter: str | None
    target: Mode
    routed_via: RoutedVia
    classification: Classification

    def rejection(self, threshold: float) -> BadInput:
        """The 422 a rejected request gets: the confidence and the top candidates."""
        c = self.classification
        top = sorted(c.scores.items(), key=lambda kv: -kv[1])[:3]
        cands = ", ".join(f"{n} ({p:.2f})" for n, p in top)
        return BadInput(
            "expert",
            f"routing confidence {c.confidence:.2f} is below {threshold}; name an expert (candidates: {cands})",
        )


def decide(c: Classification, policy: RoutingPolicy, prefer_merged: bool | None = None) -> Decision:
    """The one routing decision: from the routing adapter's verdict to who answers."""
    if c.confidence >= policy.live.confidence_threshold:
        return Decision("answer", c.label, policy.target(c.label, prefer_merged), "router", c)
    if policy.live.below_threshold == "reject":
        return Decision("reject", None, "dynamic", "router-below-threshold", c)
    return Decision("answer", None, "dynamic", "router-below-threshold", c)
