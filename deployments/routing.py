"""The routing decisions, free of Ray: which adapter, and which deployment answers it.

Kept pure so the rules are unit-tested with plain values; the ingress only carries them out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from deployments.schemas import BadInput, LiveRouterConfig

__all__ = ["RoutingPolicy", "Target"]

Target = Literal["merged", "dynamic"]


@dataclass(frozen=True)
class RoutingPolicy:
    labels: Mapping[int, str]  # router label id -> adapter name
    merged: Collection[str]  # adapters with an enabled merged deployment
    live: LiveRouterConfig
    dynamic_only_merged: Collection[
        str
    ] = ()  # merged adapters whose deployment is disabled: dynamic serves them

    @property
    def experts(self) -> set[str]:
        return set(self.merged) | set(self.dynamic_only_merged) | set(self.live.dynamic_adapters)

    def resolve_expert(self, expert: int | str) -> str:
        """An explicit expert: a router label id or an adapter name."""
        if isinstance(expert, bool):  # bool is an int in Python; never a label
            raise BadInput("expert", f"expected a label id or an adapter name, got {expert!r}")
        if isinstance(expert, int) or (isinstance(expert, str) and expert.isdigit()):
            label = int(expert)
            if label not in self.labels:
                raise BadInput("expert", f"unknown router label {label}; known: {sorted(self.labels)}")
            name = self.labels[label]
        else:
            name = expert
        if name not in self.experts:
            raise BadInput("expert", f"unknown expert {name!r}; known: {sorted(self.experts)}", 404)
        return name

    def target(self, adapter: str | None, prefer_merged: bool | None) -> Target:
        """Merged when the adapter has an enabled merged deployment and merged is preferred."""
        prefer = self.live.prefer_merged if prefer_merged is None else prefer_merged
        return "merged" if adapter is not None and prefer and adapter in self.merged else "dynamic"

    def answer_in_dynamic(self, prefer_merged: bool | None) -> list[str]:
        """Adapters the dynamic deployment should answer right after classifying (no second hop)."""
        return sorted(a for a in self.labels.values() if self.target(a, prefer_merged) == "dynamic")

    def label_names(self) -> list[str]:
        return [self.labels[k] for k in sorted(self.labels)]
