"""Traffic-aware promotion, free of Ray: which adapters deserve a merged slot, and which lose theirs.

A merged deployment answers faster than the shared dynamic-LoRA one, but merging costs GPU minutes, so
only adapters with sustained traffic get one of the few slots. The controller feeds the gateways'
request counts into a :class:`RateTracker`, asks :func:`plan` once per tick, and carries out the
:class:`Action` list; :class:`Assignments` (what each slot holds) is the state it persists and the
gateways route by. Everything here is a pure value or function, unit-tested as tables.

Flapping is prevented three ways: the demotion threshold is below the promotion one (hysteresis), an
adapter stays promoted for at least the demotion window, and neither an adapter nor a slot switches
twice within the cooldown.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from moe_core.config import PromotionLive, validate_adapter_name

__all__ = [
    "ASSIGNMENTS",
    "Action",
    "Assignment",
    "Assignments",
    "RateTracker",
    "SlotState",
    "plan",
    "read_assignments",
    "slot_key",
]

#: merging: the merge job runs; loading: the slot deployment loads the merged copy; ready: the gateways
#: route the adapter to the slot; draining: routed back to dynamic, the slot finishes what it holds.
SlotState = Literal["merging", "loading", "ready", "draining"]
SLOT_STATES: tuple[str, ...] = get_args(SlotState)


def slot_key(slot: int) -> str:
    """The ``last_switch`` key of a slot (adapter names hold no ':', so the keys cannot collide)."""
    return f"slot:{slot}"


class RateTracker:
    """Request counts per adapter in fixed time buckets, for rates averaged over a recent window.

    Buckets older than ``horizon_s`` are dropped, so memory is bounded by adapters x horizon/bucket.
    ``horizon_s`` is a plain attribute: keep it at least the longest window asked for (raise it when a
    live window grows); a longer window is refused rather than silently under-counted.
    """

    def __init__(self, bucket_s: float = 1.0, horizon_s: float = 600.0) -> None:
        if not bucket_s > 0:
            raise ValueError(f"bucket_s: expected > 0, got {bucket_s}")
        if not horizon_s >= bucket_s:
            raise ValueError(f"horizon_s: expected >= bucket_s ({bucket_s}), got {horizon_s}")
        self.bucket_s = bucket_s
        self.horizon_s = horizon_s
        self._counts: dict[str, dict[int, int]] = {}  # adapter -> bucket index -> requests
        self._first: float | None = None
        self._pruned_at: int | None = None

    def _bucket(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    def add(self, adapter: str, count: int, now: float) -> None:
        """Record ``count`` requests to ``adapter`` at ``now``. A count of 0 records no traffic but starts
        the history (:meth:`observed_s`), so an idle report counts as having watched."""
        if count < 0:
            raise ValueError(f"{adapter}: expected a request count >= 0, got {count}")
        if self._first is None:
            self._first = now
        if count:
            buckets = self._counts.setdefault(adapter, {})
            b = self._bucket(now)
            buckets[b] = buckets.get(b, 0) + count
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Drop buckets past the horizon, once per bucket of time (not on every report)."""
        current = self._bucket(now)
        if self._pruned_at == current:
            return
        self._pruned_at = current
        oldest = self._bucket(now - self.horizon_s)
        for adapter in list(self._counts):
            buckets = self._counts[adapter]
            for b in [b for b in buckets if b <= oldest]:
                del buckets[b]
            if not buckets:
                del self._counts[adapter]

    def rate(self, adapter: str, window_s: float, now: float) -> float:
        """Requests per second to ``adapter`` over the last ``window_s`` (buckets in (now-window, now])."""
        if not 0 < window_s <= self.horizon_s:
            raise ValueError(f"window_s: expected in (0, horizon_s={self.horizon_s}], got {window_s}")
        lo, hi = self._bucket(now - window_s), self._bucket(now)
        buckets = self._counts.get(adapter, {})
        return sum(n for b, n in buckets.items() if lo < b <= hi) / window_s

    def observed_s(self, now: float) -> float:
        """Seconds since the first report: no rate over a longer window is trusted yet."""
        return 0.0 if self._first is None else max(0.0, now - self._first)

    def adapters(self) -> list[str]:
        """Adapters with requests within the horizon, sorted."""
        return sorted(self._counts)


@dataclass(frozen=True)
class Assignment:
    """One slot's adapter and where its switch stands; ``since`` (wall clock) is when it entered ``state``."""

    slot: int
    adapter: str
    state: SlotState
    since: float
    reason: str


@dataclass(frozen=True)
class Assignments:
    """What every slot holds. ``revision`` is the stored state's revision (Storage.write_state returns
    ``expect + 1``), so a gateway can drop an update older than the one it routes by."""

    slots: tuple[Assignment | None, ...]
    revision: int = 0

    @classmethod
    def empty(cls, slots: int) -> Assignments:
        return cls(slots=(None,) * slots, revision=0)

    def slot_of(self, adapter: str) -> int | None:
        """The slot holding ``adapter`` in any state, or None."""
        return next((a.slot for a in self.slots if a is not None and a.adapter == adapter), None)

    def free_slots(self) -> list[int]:
        """Empty slots, lowest first."""
        return [k for k, a in enumerate(self.slots) if a is None]

    def routed(self) -> dict[str, int]:
        """Adapter -> slot for the adapters the gateways send to a slot: ``ready`` ones only."""
        return {a.adapter: a.slot for a in self.slots if a is not None and a.state == "ready"}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping; :meth:`from_json` reads it back."""
        return {
            "revision": self.revision,
            "slots": [
                None
                if a is None
                else {
                    "slot": a.slot,
                    "adapter": a.adapter,
                    "state": a.state,
                    "since": a.since,
                    "reason": a.reason,
                }
                for a in self.slots
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> Assignments:
        """Validate what :meth:`to_json` wrote; raise ValueError naming the bad part (it is read from
        storage and from other processes, so it is never trusted as it stands)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"assignments: expected a mapping, got {type(data).__name__}")
        extra = sorted(set(data) - {"revision", "slots"})
        if extra:
            raise ValueError(f"assignments: unexpected keys {extra}")
        revision = data.get("revision")
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise ValueError(f"assignments.revision: expected an integer >= 0, got {revision!r}")
        slots = data.get("slots")
        if not isinstance(slots, list):
            raise ValueError(f"assignments.slots: expected a list, got {type(slots).__name__}")
        parsed = tuple(None if s is None else _assignment(k, s) for k, s in enumerate(slots))
        names = [a.adapter for a in parsed if a is not None]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"assignments.slots: adapters {twice} hold more than one slot")
        return cls(slots=parsed, revision=revision)


#: The state (``Storage.read_state``) holding the slots' assignments: read by the gateways (to route), the
#: slots (to load) and the controller (which alone writes it, with compare-and-swap).
ASSIGNMENTS = "promotion"


def read_assignments(storage: object, slots: int) -> Assignments:
    """The stored assignments, cut or padded to ``slots`` (a config with fewer slots drops the rest).
    Here, free of Ray and of the model, so the gateway reads them without loading model code."""
    data, revision = storage.read_state(ASSIGNMENTS)  # type: ignore[attr-defined]
    stored = Assignments.from_json(data) if data else Assignments.empty(slots)
    held = stored.slots[:slots] + (None,) * max(0, slots - len(stored.slots))
    return Assignments(slots=held, revision=revision)


def _assignment(k: int, s: object) -> Assignment:
    where = f"assignments.slots[{k}]"
    if not isinstance(s, Mapping):
        raise ValueError(f"{where}: expected a mapping or null, got {type(s).__name__}")
    keys = {"slot", "adapter", "state", "since", "reason"}
    if set(s) != keys:
        raise ValueError(f"{where}: expected keys {sorted(keys)}, got {sorted(map(str, s))}")
    slot, adapter, state, since, reason = (s[key] for key in ("slot", "adapter", "state", "since", "reason"))
    if slot != k or isinstance(slot, bool):
        raise ValueError(f"{where}.slot: expected {k} (its index), got {slot!r}")
    try:
        validate_adapter_name(adapter)
    except ValueError as e:
        raise ValueError(f"{where}.adapter: {e}") from e
    if state not in SLOT_STATES:
        raise ValueError(f"{where}.state: expected one of {list(SLOT_STATES)}, got {state!r}")
    if isinstance(since, bool) or not isinstance(since, int | float) or not math.isfinite(since):
        raise ValueError(f"{where}.since: expected a finite number of seconds, got {since!r}")
    if not isinstance(reason, str):
        raise ValueError(f"{where}.reason: expected a string, got {type(reason).__name__}")
    return Assignment(slot=k, adapter=adapter, state=state, since=float(since), reason=reason)


@dataclass(frozen=True)
class Action:
    """One switch the controller carries out; ``reason`` holds the measured rate and the thresholds."""

    kind: Literal["promote", "demote"]
    adapter: str
    slot: int
    reason: str


@dataclass
class _Tick:
    """One plan's inputs and what it has decided so far."""

    now: float
    tracker: RateTracker
    live: PromotionLive
    last_switch: Mapping[str, float]
    replace_factor: float
    demotes: list[Action] = field(default_factory=list)
    promotes: list[Action] = field(default_factory=list)

    def cooling(self, key: str) -> bool:
        """Whether ``key`` (an adapter, or :func:`slot_key`) switched within the cooldown."""
        t = self.last_switch.get(key)
        return t is not None and self.now - t < self.live.cooldown_s

    def rate(self, adapter: str, window_s: float) -> float:
        return self.tracker.rate(adapter, window_s, self.now)

    def taken(self) -> set[int]:
        return {a.slot for a in self.demotes} | {a.slot for a in self.promotes}


def plan(
    now: float,
    tracker: RateTracker,
    assignments: Assignments,
    *,
    live: PromotionLive,
    pinned: Collection[str],
    last_switch: Mapping[str, float],
    replace_factor: float,
) -> list[Action]:
    """The switches to make now: demotions first (slot order), then promotions (hottest first).

    A slot gets at most one demotion and one promotion per plan, and both only for a replacement (the
    evicted adapter drains, then the candidate is merged into its slot). ``pinned`` adapters have their
    own merged deployment; ``last_switch`` maps adapters and :func:`slot_key` to their last switch time.
    """
    held = [a for a in assignments.slots if a is not None and a.state != "draining"]
    if not live.enabled:
        return [Action("demote", a.adapter, a.slot, "promotion disabled") for a in held]
    tick = _Tick(now, tracker, live, last_switch, replace_factor)
    _demote_unwanted(tick, held, pinned)
    _demote_cold(tick, held)
    candidates = _candidates(tick, assignments, pinned)
    candidates = _fill_free(tick, assignments, candidates)
    _replace_coldest(tick, held, candidates)
    return sorted(tick.demotes, key=lambda a: a.slot) + tick.promotes


def _demote_unwanted(tick: _Tick, held: list[Assignment], pinned: Collection[str]) -> None:
    """An operator's word (deny, or a merged deployment of its own) applies at once, cooldown or not."""
    for a in held:
        if a.adapter in tick.live.deny:
            tick.demotes.append(Action("demote", a.adapter, a.slot, "denied"))
        elif a.adapter in pinned:
            tick.demotes.append(
                Action("demote", a.adapter, a.slot, "pinned: served by its own merged deployment")
            )


def _demote_cold(tick: _Tick, held: list[Assignment]) -> None:
    """Ready adapters whose traffic fell below demote_rps over a whole demotion window."""
    live, taken = tick.live, tick.taken()
    for a in held:
        if a.slot in taken or a.state != "ready" or tick.cooling(a.adapter):
            continue
        if tick.now - a.since < live.demote_window_s:
            continue
        if tick.tracker.observed_s(tick.now) < live.demote_window_s:
            continue  # a restarted controller has not watched a whole window yet: no rate to judge by
        r = tick.rate(a.adapter, live.demote_window_s)
        if r < live.demote_rps:
            reason = f"{a.adapter} {r:.2f} req/s < {live.demote_rps} over {live.demote_window_s:g} s"
            tick.demotes.append(Action("demote", a.adapter, a.slot, reason))


def _candidates(tick: _Tick, assignments: Assignments, pinned: Collection[str]) -> list[tuple[str, float]]:
    """Unassigned adapters at or above promote_rps over a full window, hottest first (then by name)."""
    live = tick.live
    if tick.tracker.observed_s(tick.now) < live.promote_window_s:
        return []
    assigned = {a.adapter for a in assignments.slots if a is not None}
    out = []
    for name in tick.tracker.adapters():
        if name in assigned or name in pinned or name in live.deny or tick.cooling(name):
            continue
        r = tick.rate(name, live.promote_window_s)
        if r >= live.promote_rps:
            out.append((name, r))
    return sorted(out, key=lambda c: (-c[1], c[0]))


def _promote_reason(tick: _Tick, name: str, r: float) -> str:
    return f"{name} {r:.2f} req/s >= {tick.live.promote_rps} over {tick.live.promote_window_s:g} s"


def _fill_free(
    tick: _Tick, assignments: Assignments, candidates: list[tuple[str, float]]
) -> list[tuple[str, float]]:
    """Promote into empty slots, lowest first; return the candidates left without one."""
    free = [k for k in assignments.free_slots() if not tick.cooling(slot_key(k))]
    for k, (name, r) in zip(free, candidates, strict=False):
        tick.promotes.append(Action("promote", name, k, _promote_reason(tick, name, r)))
    return candidates[len(free) :]


def _replace_coldest(tick: _Tick, held: list[Assignment], candidates: list[tuple[str, float]]) -> None:
    """Evict the coldest ready adapters for candidates at least ``replace_factor`` times as busy."""
    window, taken = tick.live.promote_window_s, tick.taken()
    victims = sorted(
        (
            (tick.rate(a.adapter, window), a.adapter, a.slot)
            for a in held
            if a.state == "ready"
            and a.slot not in taken
            and not tick.cooling(a.adapter)
            and not tick.cooling(slot_key(a.slot))
        ),
    )
    for (name, r), (vr, victim, k) in zip(candidates, victims, strict=False):
        if r < tick.replace_factor * vr:
            break  # candidates only get colder and victims hotter from here
        why = (
            f"replaced by {name}: {r:.2f} req/s >= {tick.replace_factor:g}x {vr:.2f} req/s over {window:g} s"
        )
        tick.demotes.append(Action("demote", victim, k, why))
        tick.promotes.append(
            Action("promote", name, k, f"{_promote_reason(tick, name, r)}, replacing {victim}")
        )
