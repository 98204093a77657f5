"""Routing rules, unit-tested with plain values (no model, no Ray): explicit experts, targets, and the
one routing decision as a table."""

from __future__ import annotations

import pytest

from deployments.routing import Classification, RoutingPolicy, decide
from deployments.schemas import BadInput
from moe_core.config import GatewayLive

LABELS = {0: "calendar", 1: "claim-window", 2: "login-window"}


def live(**kw: object) -> GatewayLive:
    base = {
        "prefer_merged": True,
        "fallback_to_dynamic": True,
        "confidence_threshold": 0.5,
        "below_threshold": "reject",
        "dynamic_adapters": ["login-window"],
    }
    return GatewayLive.model_validate(base | kw)


def policy(prefer: bool = True, below: str = "reject") -> RoutingPolicy:
    return RoutingPolicy(
        LABELS, {"calendar", "claim-window"}, live(prefer_merged=prefer, below_threshold=below)
    )


@pytest.mark.parametrize(
    ("expert", "name"),
    [(0, "calendar"), ("1", "claim-window"), ("login-window", "login-window"), (2, "login-window")],
)
def test_explicit_expert_by_label_or_name(expert: int | str, name: str) -> None:
    assert policy().resolve_expert(expert) == name


@pytest.mark.parametrize(
    ("expert", "status", "words"),
    [
        (7, 422, "unknown router label 7"),
        ("desktop", 404, "unknown expert 'desktop'"),
        (True, 422, "True"),
        ("../etc", 404, "'../etc'"),
        ("²", 404, "unknown expert '²'"),  # a digit to str.isdigit, not to int()
        ("9" * 5000, 422, "unknown router label 999999999999..."),  # past int()'s digit limit
    ],
)
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


# (label, confidence, below_threshold rule, prefer_merged in config, per request) ->
# (action, adapter, target, routed_via)
DECISIONS = [
    (("calendar", 0.9, "reject", True, None), ("answer", "calendar", "merged", "router")),
    (("calendar", 0.5, "reject", True, None), ("answer", "calendar", "merged", "router")),  # at the threshold
    (("calendar", 0.9, "reject", False, None), ("answer", "calendar", "dynamic", "router")),
    (("calendar", 0.9, "reject", True, False), ("answer", "calendar", "dynamic", "router")),
    (("calendar", 0.9, "reject", False, True), ("answer", "calendar", "merged", "router")),
    (("login-window", 0.9, "reject", True, None), ("answer", "login-window", "dynamic", "router")),
    (("calendar", 0.49, "reject", True, None), ("reject", None, "dynamic", "router-below-threshold")),
    (("calendar", 0.49, "base", True, None), ("answer", None, "dynamic", "router-below-threshold")),
    (("login-window", 0.1, "base", False, True), ("answer", None, "dynamic", "router-below-threshold")),
]


@pytest.mark.parametrize(("given", "expected"), DECISIONS)
def test_decision_table(given: tuple, expected: tuple) -> None:
    label, confidence, below, prefer_cfg, prefer_req = given
    c = Classification(label, confidence, {label: confidence})
    d = decide(c, policy(prefer_cfg, below), prefer_req)
    assert (d.action, d.adapter, d.target, d.routed_via) == expected
    assert d.classification == c


def test_rejection_names_expert_and_candidates() -> None:
    c = Classification("calendar", 0.4, {"calendar": 0.4, "claim-window": 0.35, "login-window": 0.25})
    d = decide(c, policy())
    err = d.rejection(0.5)
    assert err.field == "expert" and err.status == 422
    assert "0.40 is below 0.5" in err.message and "calendar (0.40), claim-window (0.35)" in err.message


def test_disabled_merged_adapter_is_still_an_expert_served_dynamically() -> None:
    p = RoutingPolicy(LABELS, {"calendar"}, live(), {"claim-window"})
    assert p.resolve_expert("claim-window") == "claim-window"
    assert p.target("claim-window", True) == "dynamic"


@pytest.mark.parametrize("prefer", [True, False])
def test_a_further_model_is_an_expert_answered_by_its_own_deployment(prefer: bool) -> None:
    p = RoutingPolicy(LABELS, {"calendar"}, live(prefer_merged=prefer), (), {"chandra"})
    assert "chandra" in p.experts and p.resolve_expert("chandra") == "chandra"
    assert p.target("chandra", None) == "merged" and p.target("chandra", False) == "merged"
    assert p.target("login-window", None) == "dynamic"
