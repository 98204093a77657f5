"""Routing rules, unit-tested with plain values (no model, no Ray)."""

from __future__ import annotations

import pytest

from deployments.routing import RoutingPolicy
from deployments.schemas import BadInput, LiveRouterConfig

LABELS = {0: "calendar", 1: "claim-window", 2: "login-window"}


def policy(prefer: bool = True, dynamic: tuple[str, ...] = ("login-window",)) -> RoutingPolicy:
    live = LiveRouterConfig(prefer_merged=prefer, dynamic_adapters=list(dynamic))
    return RoutingPolicy(LABELS, {"calendar", "claim-window"}, live)


@pytest.mark.parametrize(
    ("expert", "name"),
    [(0, "calendar"), ("1", "claim-window"), ("login-window", "login-window"), (2, "login-window")],
)
def test_explicit_expert_by_label_or_name(expert: int | str, name: str) -> None:
    assert policy().resolve_expert(expert) == name


@pytest.mark.parametrize(
    ("expert", "status", "words"),
    [(7, 422, "unknown router label 7"), ("desktop", 404, "unknown expert 'desktop'"), (True, 422, "True"),
     ("../etc", 404, "'../etc'")],
)  # fmt: skip
def test_unknown_expert_names_the_field(expert: int | str, status: int, words: str) -> None:
    with pytest.raises(BadInput) as e:
        policy().resolve_expert(expert)
    assert e.value.field == "expert" and e.value.status == status and words in e.value.message


@pytest.mark.parametrize(
    ("adapter", "prefer_cfg", "prefer_req", "target"),
    [
        ("calendar", True, None, "merged"),
        ("calendar", False, None, "dynamic"),
        ("calendar", True, False, "dynamic"),
        ("calendar", False, True, "merged"),
        ("login-window", True, None, "dynamic"),  # no merged deployment
        (None, True, None, "dynamic"),  # the bare base model
    ],
)
def test_target(adapter: str | None, prefer_cfg: bool, prefer_req: bool | None, target: str) -> None:
    assert policy(prefer_cfg).target(adapter, prefer_req) == target


def test_dynamic_answers_right_after_classifying_only_non_merged() -> None:
    assert policy(True).answer_in_dynamic(None) == ["login-window"]
    assert policy(False).answer_in_dynamic(None) == ["calendar", "claim-window", "login-window"]


def test_disabled_merged_adapter_is_still_an_expert_served_dynamically() -> None:
    p = RoutingPolicy(
        LABELS, {"calendar"}, LiveRouterConfig(dynamic_adapters=["login-window"]), {"claim-window"}
    )
    assert p.resolve_expert("claim-window") == "claim-window"
    assert p.target("claim-window", True) == "dynamic"
