"""The promotion policy as tables: when an adapter gets a merged slot, when it loses it, and that a rate
hovering at a threshold cannot make it flap."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest

from deployments.promotion.policy import (
    Action,
    Assignment,
    Assignments,
    RateTracker,
    plan,
    slot_key,
)
from moe_core.config import PromotionLive

LIVE = PromotionLive(
    enabled=True,
    promote_rps=2.0,
    promote_window_s=30.0,
    demote_rps=0.5,
    demote_window_s=120.0,
    cooldown_s=300.0,
    deny=[],
)


def _feed(tracker: RateTracker, rps: Mapping[str, float], t0: int, t1: int) -> None:
    """Report ``rps`` requests per second for each second in [t0, t1), spread evenly over the seconds."""
    for t in range(t0, t1):
        for name, r in rps.items():
            tracker.add(name, math.floor((t + 1) * r) - math.floor(t * r), float(t))


def _tracker(rps: Mapping[str, float], until: int, start: int = 0) -> RateTracker:
    tr = RateTracker()
    _feed(tr, rps, start, until + 1)
    return tr


def _ready(*names: str | None, since: float = 0.0) -> Assignments:
    return Assignments(
        slots=tuple(
            None if n is None else Assignment(k, n, "ready", since, "test") for k, n in enumerate(names)
        ),
        revision=1,
    )


def _plan(
    now: float,
    tr: RateTracker,
    a: Assignments,
    live: PromotionLive = LIVE,
    pinned: tuple[str, ...] = (),
    last_switch: Mapping[str, float] | None = None,
) -> list[tuple[str, str, int]]:
    actions = plan(now, tr, a, live=live, pinned=pinned, last_switch=last_switch or {}, replace_factor=2.0)
    return [(x.kind, x.adapter, x.slot) for x in actions]


# ------------------------------------------------------------------------------------------ RateTracker
def test_rate_is_the_average_over_the_window() -> None:
    tr = _tracker({"calendar": 3.0, "mail": 0.5}, until=99)
    assert tr.rate("calendar", 30, 99) == pytest.approx(3.0)
    assert tr.rate("mail", 60, 99) == pytest.approx(0.5)
    assert tr.rate("nobody", 30, 99) == 0.0
    assert tr.rate("calendar", 30, 150) == 0.0  # nothing in (120, 150]
    assert tr.adapters() == ["calendar", "mail"]
    assert tr.observed_s(99) == 99 and RateTracker().observed_s(5) == 0


def test_memory_is_bounded_by_the_horizon() -> None:
    tr = RateTracker(bucket_s=1.0, horizon_s=60.0)
    _feed(tr, {"calendar": 5.0}, 0, 5000)
    assert len(tr._counts["calendar"]) <= 61
    _feed(tr, {"mail": 1.0}, 5000, 5100)  # calendar is silent for longer than the horizon: forgotten
    assert tr.adapters() == ["mail"]
    assert tr.observed_s(5100) == 5100  # the history's length is kept


def test_tracker_refuses_what_it_cannot_answer() -> None:
    tr = RateTracker(horizon_s=60.0)
    with pytest.raises(ValueError, match="window_s"):
        tr.rate("calendar", 120, 0)
    with pytest.raises(ValueError, match="count >= 0"):
        tr.add("calendar", -1, 0)
    with pytest.raises(ValueError, match="bucket_s"):
        RateTracker(bucket_s=0)


def test_idle_reports_start_the_history() -> None:
    tr = RateTracker()
    tr.add("calendar", 0, 10.0)
    assert tr.observed_s(40.0) == 30.0 and tr.adapters() == []


# ---------------------------------------------------------------------------------------------- promote
PROMOTE = [
    # (traffic, now, pinned, deny, expected)
    ({"calendar": 3.0}, 29, (), [], []),  # too little history for a 30 s window
    ({"calendar": 3.0}, 31, (), [], [("promote", "calendar", 0)]),
    ({"calendar": 1.5}, 300, (), [], []),  # below promote_rps
    ({"calendar": 2.0}, 300, (), [], [("promote", "calendar", 0)]),  # at the threshold
    ({"calendar": 9.0}, 300, ("calendar",), [], []),  # pinned: has its own merged deployment
    ({"calendar": 9.0}, 300, (), ["calendar"], []),  # denied
    ({"calendar": 9.0, "mail": 5.0}, 300, ("calendar",), [], [("promote", "mail", 0)]),
    (
        {"a": 3.0, "b": 5.0, "c": 4.0, "d": 4.0},
        300,
        (),
        [],
        [("promote", "b", 0), ("promote", "c", 1)],  # hottest first; c before d on a tie
    ),
]


@pytest.mark.parametrize(("traffic", "now", "pinned", "deny", "expected"), PROMOTE)
def test_promotion(
    traffic: dict[str, float], now: int, pinned: tuple[str, ...], deny: list[str], expected: list[Any]
) -> None:
    live = LIVE.model_copy(update={"deny": deny})
    assert _plan(now, _tracker(traffic, now), _ready(None, None), live, pinned) == expected


def test_promotes_into_the_lowest_free_slot_and_leaves_assigned_adapters() -> None:
    tr = _tracker({"calendar": 5.0, "mail": 5.0, "notes": 5.0}, 100)
    a = Assignments(
        slots=(
            Assignment(0, "calendar", "merging", 90.0, "x"),
            None,
            Assignment(2, "mail", "draining", 95.0, "x"),
            None,
        ),
        revision=3,
    )
    assert _plan(100, tr, a) == [("promote", "notes", 1)]


def test_promotion_reason_holds_rate_and_thresholds() -> None:
    (action,) = plan(
        100,
        _tracker({"calendar": 3.2}, 100),
        _ready(None),
        live=LIVE,
        pinned=(),
        last_switch={},
        replace_factor=2.0,
    )
    assert action == Action("promote", "calendar", 0, "calendar 3.20 req/s >= 2.0 over 30 s")


# ----------------------------------------------------------------------------------------------- demote
DEMOTE = [
    # (now, since, last switch of calendar, expected): 3 req/s until t=200, then nothing
    (250, 0.0, None, []),  # still 1.75 req/s over (130, 250]
    (330, 0.0, None, [("demote", "calendar", 0)]),  # 0 req/s over (210, 330]
    (330, 0.0, 100.0, []),  # promoted at 100: in its cooldown until 400
    (400, 0.0, 100.0, [("demote", "calendar", 0)]),
    (330, 250.0, None, []),  # promoted 80 s ago: not yet a whole demotion window
]


@pytest.mark.parametrize(("now", "since", "switched", "expected"), DEMOTE)
def test_demotion_after_traffic_stops(
    now: int, since: float, switched: float | None, expected: list[Any]
) -> None:
    tr = _tracker({"calendar": 3.0}, 200)
    last = {} if switched is None else {"calendar": switched}
    assert _plan(now, tr, _ready("calendar", since=since), last_switch=last) == expected


def test_demotion_reason_holds_rate_and_thresholds() -> None:
    (action,) = plan(
        400,
        _tracker({"calendar": 3.0}, 200),
        _ready("calendar"),
        live=LIVE,
        pinned=(),
        last_switch={},
        replace_factor=2.0,
    )
    assert action.reason == "calendar 0.00 req/s < 0.5 over 120 s"


def test_only_ready_adapters_are_demoted_for_low_traffic() -> None:
    a = Assignments(
        slots=(Assignment(0, "calendar", "merging", 0.0, "x"), Assignment(1, "mail", "loading", 0.0, "x")),
        revision=1,
    )
    assert _plan(1000, RateTracker(), a) == []


def test_denied_and_pinned_adapters_lose_their_slot_at_once() -> None:
    tr = _tracker({"calendar": 9.0, "mail": 9.0, "notes": 9.0}, 100)
    live = LIVE.model_copy(update={"deny": ["calendar"]})
    last = {"calendar": 90.0, "mail": 90.0}  # the operator's word beats the cooldown
    actions = plan(
        100,
        tr,
        _ready("calendar", "mail", "notes", since=90),
        live=live,
        pinned=("mail",),
        last_switch=last,
        replace_factor=2.0,
    )
    assert [(x.kind, x.adapter, x.slot, x.reason.split(":")[0]) for x in actions] == [
        ("demote", "calendar", 0, "denied"),
        ("demote", "mail", 1, "pinned"),
    ]


def test_disabled_demotes_everything_assigned() -> None:
    tr = _tracker({"calendar": 9.0, "mail": 9.0}, 100)
    a = Assignments(
        slots=(
            Assignment(0, "calendar", "ready", 0.0, "x"),
            Assignment(1, "notes", "merging", 99.0, "x"),
            Assignment(2, "mail", "draining", 99.0, "x"),  # already on its way out
            None,
        ),
        revision=4,
    )
    actions = plan(
        100,
        tr,
        a,
        live=LIVE.model_copy(update={"enabled": False}),
        pinned=(),
        last_switch={"calendar": 99},
        replace_factor=2.0,
    )
    assert actions == [
        Action("demote", "calendar", 0, "promotion disabled"),
        Action("demote", "notes", 1, "promotion disabled"),
    ]


# ---------------------------------------------------------------------------------------------- replace
REPLACE = [
    # (traffic, last switch, expected): both slots full with cold (1 req/s) and warm (2.5 req/s)
    ({"hot": 1.9}, {}, []),  # below promote_rps: no candidate
    (
        {"hot": 3.0},
        {},
        [("demote", "cold", 1), ("promote", "hot", 1)],  # the coldest goes, the hot one takes its slot
    ),
    ({"hot": 3.0}, {"cold": 950.0}, []),  # the coldest is in its cooldown; warm is not cold enough
    ({"hot": 6.0}, {"cold": 950.0}, [("demote", "warm", 0), ("promote", "hot", 0)]),
    ({"hot": 3.0}, {slot_key(1): 950.0}, []),  # the coldest's slot is in its cooldown
    ({"hot": 3.0}, {"hot": 950.0}, []),  # the candidate is in its cooldown
    (
        {"hot": 6.0, "hotter": 7.0},
        {},
        [("demote", "warm", 0), ("demote", "cold", 1), ("promote", "hotter", 1), ("promote", "hot", 0)],
    ),
]


@pytest.mark.parametrize(("traffic", "last", "expected"), REPLACE)
def test_replacement_of_the_coldest(
    traffic: dict[str, float], last: dict[str, float], expected: list[Any]
) -> None:
    tr = _tracker({"warm": 2.5, "cold": 1.0, **traffic}, 1000)
    assert _plan(1000, tr, _ready("warm", "cold"), last_switch=last) == expected


def test_replacement_needs_twice_the_rate() -> None:
    a = _ready("warm", "cold")
    just_under = _tracker({"warm": 2.5, "cold": 1.5, "hot": 2.9}, 1000)
    assert _plan(1000, just_under, a) == []
    at_twice = _tracker({"warm": 2.5, "cold": 1.5, "hot": 3.0}, 1000)
    (demote, promote) = plan(1000, at_twice, a, live=LIVE, pinned=(), last_switch={}, replace_factor=2.0)
    assert (demote.kind, demote.adapter, promote.adapter, promote.slot) == ("demote", "cold", "hot", 1)
    assert "replaced by hot: 3.00 req/s >= 2x 1.50 req/s" in demote.reason
    # a higher replace_factor (promotion.replace_factor) keeps the cold one at twice its rate
    assert plan(1000, at_twice, a, live=LIVE, pinned=(), last_switch={}, replace_factor=2.5) == []
    (demote, _) = plan(1000, at_twice, a, live=LIVE, pinned=(), last_switch={}, replace_factor=1.5)
    assert "replaced by hot: 3.00 req/s >= 1.5x 1.50 req/s" in demote.reason


def test_a_slot_gets_at_most_one_promotion_and_one_demotion_per_plan() -> None:
    tr = _tracker({f"a{i}": 10.0 + i for i in range(8)} | {"cold": 0.0, "warm": 1.0}, 1000)
    a = Assignments(slots=(*_ready("cold", "warm").slots, None), revision=1)
    actions = plan(1000, tr, a, live=LIVE, pinned=(), last_switch={}, replace_factor=2.0)
    assert [(x.kind, x.adapter, x.slot) for x in actions] == [
        ("demote", "cold", 0),  # idle for a whole window: it drains, its slot is not reused in this plan
        ("demote", "warm", 1),  # replaced
        ("promote", "a7", 2),  # the free slot first
        ("promote", "a6", 1),
    ]
    for kind in ("promote", "demote"):
        slots = [x.slot for x in actions if x.kind == kind]
        assert len(slots) == len(set(slots))


# -------------------------------------------------------------------------------------------- flapping
def _apply(a: Assignments, actions: list[Action], now: float, last: dict[str, float]) -> Assignments:
    """Carry out a plan at once (no merge or drain time): enough to count switches."""
    slots = list(a.slots)
    for x in actions:
        slots[x.slot] = Assignment(x.slot, x.adapter, "ready", now, x.reason) if x.kind == "promote" else None
        last[x.adapter] = last[slot_key(x.slot)] = now
    return Assignments(tuple(slots), a.revision + 1)


def _simulate(
    rps: Callable[[int], Mapping[str, float]], cooldown_s: float, slots: int
) -> list[tuple[int, Action]]:
    """Ten minutes of one tick a second; returns every switch with its time."""
    live = LIVE.model_copy(update={"cooldown_s": cooldown_s, "demote_window_s": 60.0})
    tr, a, last = RateTracker(), Assignments.empty(slots), dict[str, float]()
    switches: list[tuple[int, Action]] = []
    for t in range(600):
        _feed(tr, rps(t), t, t + 1)
        actions = plan(float(t), tr, a, live=live, pinned=(), last_switch=last, replace_factor=2.0)
        switches += [(t, x) for x in actions]
        a = _apply(a, actions, float(t), last)
    return switches


def _square(t: int) -> dict[str, float]:
    """calendar: 4 req/s for 40 s, then idle for 80 s, over and over."""
    return {"calendar": 4.0 if t % 120 < 40 else 0.0}


def _seesaw(t: int) -> dict[str, float]:
    """Two adapters fighting over one slot, taking turns at 8 and 1 req/s every 50 s."""
    hi = (t // 50) % 2 == 0
    return {"calendar": 8.0 if hi else 1.0, "mail": 1.0 if hi else 8.0}


@pytest.mark.parametrize(("rps", "slots"), [(_square, 1), (_seesaw, 1)], ids=["square", "seesaw"])
def test_cooldown_prevents_flapping(rps: Callable[[int], Mapping[str, float]], slots: int) -> None:
    unprotected = _simulate(rps, cooldown_s=0.0, slots=slots)
    switches = _simulate(rps, cooldown_s=300.0, slots=slots)
    assert switches and len(unprotected) > len(switches)  # the traffic would flap without a cooldown
    for key in {x.adapter for _, x in switches} | {slot_key(x.slot) for _, x in switches}:
        times = sorted({t for t, x in switches if key in (x.adapter, slot_key(x.slot))})
        assert all(b - a >= 300 for a, b in itertools.pairwise(times)), (key, times)


def test_rate_hovering_at_the_promotion_threshold_switches_once() -> None:
    """Hysteresis: 2 +- 1.5 req/s promotes once and never falls under demote_rps."""
    switches = _simulate(lambda t: {"calendar": 2.0 + 1.5 * math.sin(t / 10)}, cooldown_s=0.0, slots=1)
    assert [(x.kind, x.adapter) for _, x in switches] == [("promote", "calendar")]


# ------------------------------------------------------------------------------------------------- JSON
def test_assignments_json_round_trip() -> None:
    a = Assignments(
        slots=(Assignment(0, "calendar", "ready", 12.5, "calendar 3.20 req/s >= 2.0 over 30 s"), None),
        revision=7,
    )
    assert Assignments.from_json(a.to_json()) == a
    assert a.slot_of("calendar") == 0 and a.slot_of("mail") is None
    assert a.free_slots() == [1] and a.routed() == {"calendar": 0}
    loading = replace(a, slots=(replace(a.slots[0], state="loading"), None))  # type: ignore[type-var]
    assert loading.routed() == {} and loading.slot_of("calendar") == 0
    assert Assignments.empty(2) == Assignments((None, None), 0)


def _doc(**slot: object) -> dict[str, Any]:
    entry = {"slot": 0, "adapter": "calendar", "state": "ready", "since": 1.0, "reason": "r"} | slot
    return {"revision": 1, "slots": [entry]}


BAD_JSON: list[tuple[object, str]] = [
    ([], "assignments: expected a mapping"),
    ({"revision": 1}, "assignments.slots: expected a list"),
    ({"revision": -1, "slots": []}, "assignments.revision"),
    ({"revision": "1", "slots": []}, "assignments.revision"),
    ({"revision": 1, "slots": [], "extra": 1}, "unexpected keys ['extra']"),
    ({"revision": 1, "slots": ["calendar"]}, r"assignments.slots[0]: expected a mapping or null"),
    (_doc(slot=1), r"assignments.slots[0].slot: expected 0"),
    (_doc(adapter="../etc"), r"assignments.slots[0].adapter: invalid adapter name"),
    (_doc(state="merged"), r"assignments.slots[0].state: expected one of"),
    (_doc(since="noon"), r"assignments.slots[0].since"),
    (_doc(since=float("nan")), r"assignments.slots[0].since"),
    (_doc(reason=None), r"assignments.slots[0].reason"),
    ({"revision": 1, "slots": [{"slot": 0}]}, r"assignments.slots[0]: expected keys"),
    (
        {"revision": 1, "slots": [_doc()["slots"][0], _doc(slot=1)["slots"][0]]},
        "adapters ['calendar'] hold more than one slot",
    ),
]


@pytest.mark.parametrize(("data", "words"), BAD_JSON, ids=[w for _, w in BAD_JSON])
def test_bad_assignments_json_is_refused(data: object, words: str) -> None:
    with pytest.raises(ValueError) as e:
        Assignments.from_json(data)
    assert words in str(e.value)


def test_a_restarted_controller_does_not_demote_before_it_has_watched_a_whole_window() -> None:
    """A fresh tracker has counted nothing yet: an adapter promoted long ago is not judged cold by it."""
    live = PromotionLive.default().model_copy(
        update={
            "enabled": True,
            "promote_rps": 1.0,
            "demote_rps": 0.5,
            "demote_window_s": 10.0,
            "cooldown_s": 0.0,
        }
    )
    held = Assignments(slots=(Assignment(0, "calendar", "ready", 0.0, "earlier"),), revision=3)
    tracker = RateTracker()
    tracker.add("calendar", 0, 1000.0)  # the first report after the restart
    assert plan(1001.0, tracker, held, live=live, pinned=(), last_switch={}, replace_factor=2.0) == []
    for t in range(1002, 1012):
        tracker.add("calendar", 0, float(t))
    (action,) = plan(1011.0, tracker, held, live=live, pinned=(), last_switch={}, replace_factor=2.0)
    assert (action.kind, action.adapter) == ("demote", "calendar")
