"""The promotion slots' autoscaling policy: Serve's own, with a floor of one replica while the slot is
assigned.

Serve's request-based policy sees only load. A slot that was just assigned looks idle to it: while it
loads, its only caller is the controller asking whether it is ready, and once the gateways route to it
their load reaches the autoscaler only with their next metrics report. Left alone, Serve scaled such a
slot to zero within its downscale delay, and the next requests met a replica that had to start and load
again (they fell back to dynamic, or waited seconds). So every slot replica reports, as a custom
autoscaling metric (``record_autoscaling_stats``), whether the stored assignments give its slot an
adapter (:data:`SLOT_HELD`: 1 or 0, as it read them last, every refresh interval), and
:func:`keep_assigned_slots` keeps at least one replica while any running replica reports 1 over the
look-back window, or has not reported yet (a replica just started: for a few metric intervals). Above
the floor, and for a free slot, it is Serve's default policy, with the deployment's delays and bounds.
The assignment stays where the controller writes it (shared storage); Serve's controller, which runs
this policy, reads no storage and needs nothing of this project but this module (Serve pickles it by
value), only ``ray``.

A slot at zero replicas reports nothing: it is woken by a request, the controller's own while it waits
for the slot to load (``status``), and its replica loads its assignment before it takes requests.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

__all__ = ["SLOT_HELD", "SLOT_POLICY", "held", "keep_assigned_slots"]

#: The custom autoscaling metric of a slot replica: 1 while its slot is assigned, else 0.
SLOT_HELD = "slot_held"
#: The import path of the slot deployments' policy (``autoscaling_config.policy.policy_function``).
SLOT_POLICY = "deployments.promotion.autoscaling:keep_assigned_slots"
#: A running replica that has not reported counts as holding its slot for this many metric intervals.
UNREPORTED_GRACE_INTERVALS = 3
#: Where the policy remembers when it first saw each running replica (in Serve's policy state).
_FIRST_SEEN = "slot_first_seen"


def held(ctx: Any, first_seen: dict[str, float], now: float) -> bool:
    """Whether a running replica of the slot holds an assignment: it reported :data:`SLOT_HELD` above 0
    within the look-back window, or it has not reported since Serve started it (within the grace)."""
    reported = (ctx.aggregated_metrics or {}).get(SLOT_HELD, {})
    grace = UNREPORTED_GRACE_INTERVALS * float(getattr(ctx.config, "metrics_interval_s", 10.0))
    for replica in ctx.running_replicas:
        value = reported.get(replica)
        if value is None:
            if now - first_seen.get(str(replica), now) < grace:
                return True
        elif value > 0:
            return True
    return False


def keep_assigned_slots(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's request-based policy, never below one replica while the slot is assigned (see the module)."""
    desired, state = replica_queue_length_autoscaling_policy(ctx)
    now = ctx.current_time if ctx.current_time is not None else time.time()
    seen = dict((ctx.policy_state or {}).get(_FIRST_SEEN) or {})
    running = {str(r) for r in ctx.running_replicas}
    first_seen = {r: seen.get(r, now) for r in running}  # replicas gone are forgotten
    if ctx.running_replicas and held(ctx, first_seen, now):
        desired = max(desired, 1)
    return desired, dict(state or {}) | {_FIRST_SEEN: first_seen}
