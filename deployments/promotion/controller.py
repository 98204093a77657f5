"""The promotion controller: hot adapters get a merged slot, cold ones go back to the dynamic server.

One small deployment (``PromotionController``, one replica, no CPU reserved). Every gateway replica
reports its per-adapter request counts each ``promotion.report_interval_s``; the controller keeps rates
over sliding windows (:class:`~deployments.promotion.policy.RateTracker`) and, every ``interval_s``, asks
:func:`~deployments.promotion.policy.plan` what to switch, with the live thresholds of its user_config.

Promotion of ``a`` into slot ``k``:
    1. ``merging``: make sure a merged version of ``a``'s current LoRA version is published: a merge
       task on the cluster (``merge_jobs``: fp32 merge, verified against the unmerged adapter, published
       atomically), skipped when the published merged version already comes from that LoRA version;
    2. ``loading``: slot ``k``'s replicas read the assignment and load the merged model; the controller
       waits until the slot reports it serves ``a``;
    3. ``ready``: the gateways (which read the assignments every report interval) send ``a`` there.
Until step 3 the dynamic deployment answers ``a``. Demotion: ``draining`` (the gateways route ``a`` back to
dynamic), ``drain_s`` later the slot is freed. Each step is one compare-and-swap write of the assignments
in shared storage, so a restarted controller, gateway or slot resumes from there; a promotion that was
cut off mid-way (``merging`` or ``loading`` found at start) is carried on.

Every decision is logged with the rates that triggered it; ``python -m deployments.promotion.controller status``
prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from deployments.observability import PromotionMetrics, request_logger
from deployments.promotion.policy import (
    ASSIGNMENTS,
    Action,
    Assignment,
    Assignments,
    RateTracker,
    plan,
    read_assignments,
    slot_key,
)
from deployments.settings import PromotionSettings
from moe_core.config import ConfigError, PromotionLive, validate_adapter_name
from moe_core.storage.errors import StateConflict, StorageError, StorageUnavailable
from moe_core.storage.store import Storage

__all__ = ["CONTROLLER_NAME", "PromotionController", "main"]

logger = request_logger("promotion")  # under ray.serve: in the replica's log, with its ids

CONTROLLER_NAME = "PromotionController"
#: Merge task: (config JSON, adapter) -> an awaitable of its result (a Ray ObjectRef on the cluster).
MergeFn = Callable[[str, str], Any]


@dataclass
class _Switch:
    """Timings of one promotion, from the decision to the slot serving it (seconds)."""

    adapter: str
    slot: int
    decided_at: float
    merge_s: float | None = None
    load_s: float | None = None
    ready_at: float | None = None
    merged: bool = False  # whether a merge ran (False: a published merged version was current)


def _ray_merge(config_json: str, adapter: str, cpu: float, gpu: float) -> Any:
    """Submit the merge job's task (merge_jobs) to the cluster; returns its ObjectRef."""
    import ray

    from merge_jobs.__main__ import _merge_one

    task = ray.remote(_merge_one).options(num_cpus=cpu, num_gpus=gpu, max_retries=0)
    return task.remote(config_json, adapter, None, None)


class PromotionController:
    def __init__(
        self,
        settings: PromotionSettings,
        slots: Sequence[Any],
        *,
        merge: MergeFn | None = None,
        storage: Storage | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.slots = list(slots)
        self.storage = storage or Storage.from_config(settings.storage)
        self.merge: MergeFn = merge or (
            lambda cfg, adapter: _ray_merge(cfg, adapter, settings.merge_cpu, settings.merge_gpu)
        )
        self.clock = clock
        self.live: PromotionLive | None = None
        self.tracker = RateTracker(bucket_s=1.0, horizon_s=600.0)
        self.assignments = Assignments.empty(settings.slots)  # until the stored ones are read
        self.last_switch: dict[str, float] = {}
        self.switches: dict[str, _Switch] = {}
        self.metrics = PromotionMetrics()
        self.decisions: list[dict[str, Any]] = []  # the latest ones, for status()
        self._busy: dict[int, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None
        self._resumed = False
        try:
            self._resume()
        except StorageUnavailable as e:  # a transient outage must not fail the replica: ticks retry
            logger.warning(
                "promotion: storage unavailable at start (%s); deciding nothing until it is back", e
            )

    def _resume(self) -> None:
        """Refuse a store without compare-and-swap (a StorageError: the replica fails, as it must) and
        take the stored assignments up; blocking. Until it has succeeded nothing is decided."""
        self.storage.check_compare_and_swap()  # the assignments are written with compare-and-swap
        self.assignments = read_assignments(self.storage, self.settings.slots)
        # the switches the stored assignments record count for the cooldown, so a restart does not flap
        for a in self.assignments.slots:
            if a is not None:
                self.last_switch[a.adapter] = self.last_switch[slot_key(a.slot)] = a.since
        for k, a in enumerate(self.assignments.slots):
            self.metrics.holds(k, a.adapter if a else None, a.state if a else None)
        self._resumed = True
        logger.info("promotion: resumed %s", _table(self.assignments))

    # ------------------------------------------------------------ Serve API
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live thresholds from `serve deploy`; validated, then swapped in one assignment."""
        live = PromotionLive.from_user_config(user_config, CONTROLLER_NAME)
        self.tracker.horizon_s = max(600.0, 2 * live.promote_window_s, 2 * live.demote_window_s)
        self.live = live
        logger.info("promotion: reconfigured: %s", live.model_dump())

    async def report(self, counts: Mapping[str, int]) -> None:
        """Request counts since a gateway's last report (that gateway's view: the rates add up)."""
        now = self.clock()
        self.tracker.add("", 0, now)  # an idle report still counts as watching (starts the history)
        for adapter, n in counts.items():
            try:
                validate_adapter_name(adapter)
            except ValueError:
                continue
            if isinstance(n, int) and n > 0:
                self.tracker.add(adapter, n, now)
        self._start()

    async def status(self) -> dict[str, Any]:
        """Slots, rates over the live windows, the latest decisions and each promotion's timings."""
        self._start()
        live, now = self.live or PromotionLive.default(), self.clock()
        return {
            "enabled": live.enabled,
            "slots": self.assignments.to_json()["slots"],
            "rates": {
                n: {
                    "promote_window": round(self.tracker.rate(n, live.promote_window_s, now), 3),
                    "demote_window": round(self.tracker.rate(n, live.demote_window_s, now), 3),
                }
                for n in self.tracker.adapters()
            },
            "decisions": self.decisions[-20:],
            "switches": {n: vars(s) for n, s in self.switches.items()},
            "revision": self.assignments.revision,
        }

    def check_health(self) -> None:
        if self._loop is not None and self._loop.done() and not self._loop.cancelled():
            raise RuntimeError(f"promotion: the decision loop ended: {self._loop.exception()!r}")

    # ------------------------------------------------------------ decisions
    def _start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run())
            if self._resumed:
                self._carry_on_unfinished()

    def _carry_on_unfinished(self) -> None:
        for a in self.assignments.slots:  # a promotion or demotion cut off by a restart: carry it on
            if a is not None and a.state != "ready" and not self._running(a.slot):
                self._carry_on(a)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a failed tick is logged; the next one reads everything again
                logger.exception("promotion: tick failed")
            await asyncio.sleep(self.settings.interval_s)

    async def tick(self) -> list[Action]:
        """One decision: plan against the stored assignments and start the switches it asks for."""
        if not self._resumed:  # the storage was out when this replica started
            try:
                await asyncio.to_thread(self._resume)
            except StorageUnavailable as e:
                logger.warning("promotion: storage still unavailable (%s); deciding nothing", e)
                return []
            self._carry_on_unfinished()
        if self.live is None:
            return []
        stored = await asyncio.to_thread(read_assignments, self.storage, self.settings.slots)
        if stored.revision >= self.assignments.revision:  # a read older than our own last write is dropped
            self.assignments = stored
        for a in self.assignments.slots:
            if a is None or self._running(a.slot):
                continue
            if a.state != "ready":  # a switch whose task died (a storage outage mid-way): carry it on
                self._carry_on(a)
            elif not await asyncio.to_thread(self._merged_is_current, a.adapter):
                # a new LoRA version was published while it was promoted: merge it again (dynamic answers
                # meanwhile, as the slot's assignment is no longer "ready")
                self._busy[a.slot] = asyncio.get_running_loop().create_task(
                    self._carry_out(
                        [Action("promote", a.adapter, a.slot, f"new adapter version: {a.reason}")]
                    )
                )
        now = self.clock()
        actions = plan(
            now,
            self.tracker,
            self.assignments,
            live=self.live,
            pinned=self.settings.pinned,
            last_switch=self.last_switch,
            replace_factor=self.settings.replace_factor,
        )
        by_slot: dict[int, list[Action]] = {}
        for action in actions:
            by_slot.setdefault(action.slot, []).append(action)
        for k, slot_actions in by_slot.items():
            if self._running(k):
                continue
            for action in slot_actions:
                self.decisions.append(
                    {
                        "at": now,
                        "kind": action.kind,
                        "adapter": action.adapter,
                        "slot": k,
                        "reason": action.reason,
                    }
                )
                logger.info("promotion: %s %s (slot %d): %s", action.kind, action.adapter, k, action.reason)
                self.last_switch[action.adapter] = self.last_switch[slot_key(k)] = now
            self._busy[k] = asyncio.get_running_loop().create_task(self._carry_out(slot_actions))
        del self.decisions[:-100]
        return actions

    def _running(self, k: int) -> bool:
        task = self._busy.get(k)
        return task is not None and not task.done()

    def _carry_on(self, a: Assignment) -> None:
        live = self.live or PromotionLive.default()
        if not live.enabled or a.adapter in live.deny:
            action = Action("demote", a.adapter, a.slot, "resumed: promotion disabled or adapter denied")
        elif a.state == "draining":
            action = Action("demote", a.adapter, a.slot, f"resumed: {a.reason}")
        else:
            action = Action("promote", a.adapter, a.slot, f"resumed: {a.reason}")
        self._busy[a.slot] = asyncio.get_running_loop().create_task(self._carry_out([action], resumed=True))

    async def _carry_out(self, actions: list[Action], resumed: bool = False) -> None:
        for action in actions:
            try:
                if action.kind == "demote":
                    await self._demote(action)
                else:
                    await self._promote(action, resumed)
                self.metrics.switches.inc(
                    tags={"kind": action.kind, "adapter": action.adapter, "outcome": "done"}
                )
            except Exception:
                self.metrics.switches.inc(
                    tags={"kind": action.kind, "adapter": action.adapter, "outcome": "failed"}
                )
                logger.exception(
                    "promotion: %s %s (slot %d) failed; the slot is freed",
                    action.kind,
                    action.adapter,
                    action.slot,
                )
                await self._write(action.slot, None)
                self.last_switch[action.adapter] = self.last_switch[slot_key(action.slot)] = self.clock()
                return

    async def _promote(self, action: Action, resumed: bool) -> None:
        k, adapter = action.slot, action.adapter
        sw = self.switches[adapter] = _Switch(adapter, k, self.clock())
        current = self.assignments.slots[k]
        if not (
            resumed and current is not None and current.adapter == adapter and current.state == "loading"
        ):
            await self._write(k, Assignment(k, adapter, "merging", self.clock(), action.reason))
            t0 = time.perf_counter()
            if not await asyncio.to_thread(self._merged_is_current, adapter):
                logger.info("promotion: %s: merging (a merge task on the cluster)", adapter)
                ref = self.merge(self.settings.config_json, adapter)
                try:
                    await asyncio.wait_for(_awaitable(ref), self.settings.merge_timeout_s)
                except TimeoutError:
                    _cancel(ref)
                    raise TimeoutError(
                        f"the merge of {adapter} took over {self.settings.merge_timeout_s:.0f} s"
                    ) from None
                sw.merged = True
            sw.merge_s = time.perf_counter() - t0
        await self._write(k, Assignment(k, adapter, "loading", self.clock(), action.reason))
        t0 = time.perf_counter()
        await self._wait_loaded(k, adapter)
        sw.load_s = time.perf_counter() - t0
        await self._write(k, Assignment(k, adapter, "ready", self.clock(), action.reason))
        sw.ready_at = self.clock()
        for part, seconds in (
            ("merge", sw.merge_s),
            ("load", sw.load_s),
            ("total", sw.ready_at - sw.decided_at),
        ):
            if seconds is not None:
                self.metrics.seconds.observe(seconds, tags={"part": part})
        logger.info(
            "promotion: %s is served by slot %d: %s %.1f s, load %.1f s, %.1f s from the decision (%s)",
            adapter,
            k,
            "merge" if sw.merged else "merged version current, check",
            sw.merge_s or 0.0,
            sw.load_s,
            sw.ready_at - sw.decided_at,
            action.reason,
        )

    async def _demote(self, action: Action) -> None:
        k, adapter = action.slot, action.adapter
        held = self.assignments.slots[k]
        if held is None or held.adapter != adapter:
            return
        await self._write(k, Assignment(k, adapter, "draining", self.clock(), action.reason))
        await asyncio.sleep(self.settings.drain_s)  # the gateways route it back to dynamic meanwhile
        await self._write(k, None)
        self.switches.pop(adapter, None)
        logger.info(
            "promotion: %s is back on the dynamic deployment; slot %d is free (%s)", adapter, k, action.reason
        )

    def _merged_is_current(self, adapter: str) -> bool:
        """Whether the published merged version was built from the adapter's published LoRA version."""
        merged = self.storage.current_version("merged", adapter)
        lora = self.storage.current_version("expert", adapter)
        if merged is None or lora is None:
            return merged is not None
        meta = self.storage.read_json("merged", adapter, "merge_metadata.json", merged)
        if meta.get("source_version") == lora:
            return True
        # the same weights republished as a new version: the merge job keeps the merged version it has
        try:
            deployed = self.storage.read_json("expert", adapter, "deploy_metadata.json", lora)
        except (OSError, ValueError, StorageError):  # no readable metadata: merge it again
            return False
        digest = meta.get("source_adapter_sha256")
        return bool(digest) and digest == deployed.get("adapter_sha256")

    async def _wait_loaded(self, k: int, adapter: str) -> None:
        deadline = time.monotonic() + self.settings.load_timeout_s
        while True:
            try:
                st = await asyncio.wait_for(_awaitable(self.slots[k].status.remote()), 30.0)
                if st.adapter == adapter and st.ready:
                    return
            except Exception as e:  # a replica starting (scale from zero) or restarting
                logger.info("promotion: slot %d not answering yet (%s)", k, e)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"slot {k} did not load {adapter} within {self.settings.load_timeout_s:.0f} s"
                )
            await asyncio.sleep(0.25)

    async def _write(self, k: int, a: Assignment | None) -> None:
        """Set slot ``k``'s assignment with compare-and-swap: re-read and retried on a conflict, and on
        storage errors for up to ``write_retry_s`` (an outage must not leave a switch half-written)."""
        deadline = time.monotonic() + self.settings.write_retry_s
        delay = 0.5
        while True:
            try:
                if await self._try_write(k, a):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"slot {k}: the assignments kept changing under this writer")
            except StorageError as e:
                if time.monotonic() > deadline:
                    raise
                logger.warning(
                    "promotion: slot %d: storage error writing the assignments (%s); retrying", k, e
                )
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _try_write(self, k: int, a: Assignment | None) -> bool:
        """One compare-and-swap of slot ``k`` (re-read on a conflict); False when it kept losing."""
        for _ in range(20):
            current = await asyncio.to_thread(read_assignments, self.storage, self.settings.slots)
            slots = list(current.slots)
            if a is not None and any(h is not None and h.adapter == a.adapter and h.slot != k for h in slots):
                raise ValueError(f"{a.adapter} already holds another slot; not assigned to slot {k}")
            slots[k] = a
            new = replace(current, slots=tuple(slots), revision=current.revision + 1)
            try:
                await asyncio.to_thread(
                    self.storage.write_state, ASSIGNMENTS, new.to_json(), expect=current.revision
                )
            except StateConflict:
                continue
            self.assignments = new
            self.metrics.holds(k, a.adapter if a else None, a.state if a else None)
            return True
        return False


async def _awaitable(response: Any) -> Any:
    return await response


def _cancel(ref: Any) -> None:
    """Cancel a merge task that ran too long (a Ray ObjectRef; anything else is left alone)."""
    try:
        import ray

        if isinstance(ref, ray.ObjectRef):
            ray.cancel(ref, force=True)
    except Exception as e:  # best effort: the slot is freed either way
        logger.warning("promotion: could not cancel a merge task (%s)", e)


def _table(assignments: Assignments) -> str:
    rows = [
        f"slot {k}: "
        + (
            "free"
            if a is None
            else f"{a.adapter} ({a.state} since {time.strftime('%H:%M:%S', time.localtime(a.since))})"
        )
        for k, a in enumerate(assignments.slots)
    ]
    return "; ".join(rows) or "no slots"


def main(argv: list[str] | None = None) -> int:
    """``python -m deployments.promotion.controller status``: the slots as stored, and the controller's view."""
    p = argparse.ArgumentParser(
        prog="python -m deployments.promotion.controller", description=__doc__.split("\n")[0]
    )
    p.add_argument("command", choices=["status"])
    p.add_argument("--config", default="config/deployment.yaml")
    p.add_argument("--app", default="moe", help="Serve application name (for the controller's live view)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        from moe_core.config import DeploymentConfig

        cfg = DeploymentConfig.from_file(args.config)
    except (OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stored = read_assignments(Storage.from_config(cfg.storage), cfg.promotion.slots)
    view: dict[str, Any] | None = None
    try:
        from ray import serve

        handle = serve.get_deployment_handle(CONTROLLER_NAME, app_name=args.app)
        view = handle.status.remote().result(timeout_s=30)  # the first call connects and resolves the replica
    except Exception as e:  # no cluster, or promotion off: the stored table still stands
        print(f"(no live view from the controller: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
    if args.json:
        print(json.dumps({"stored": stored.to_json(), "controller": view}, indent=2, default=str))
        return 0
    print(f"{'slot':<5} {'adapter':<16} {'state':<9} {'since':<9} reason")
    for k, a in enumerate(stored.slots):
        if a is None:
            print(f"{k:<5} {'-':<16} {'free':<9}")
        else:
            since = time.strftime("%H:%M:%S", time.localtime(a.since))
            print(f"{k:<5} {a.adapter:<16} {a.state:<9} {since:<9} {a.reason}")
    if view:
        print("\nrates (req/s over the promote / demote windows):")
        for name, r in sorted(view["rates"].items()):
            print(f"  {name:<16} {r['promote_window']:>8.2f} {r['demote_window']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
