"""Promotion slots: merged deployments that are not tied to an adapter when the app is built.

The app builder binds ``promotion.slots`` of them (``MergedSlot-0``, ``MergedSlot-1``, ...), each with its
own autoscaling (scaled to zero while nothing is assigned, never while assigned: the policy in
:mod:`deployments.promotion.autoscaling`, fed by each replica's :meth:`MergedSlot.record_autoscaling_stats`).
Which adapter a slot serves is decided by the promotion controller (:mod:`deployments.promotion.controller`) and
stored in shared storage (:data:`~deployments.promotion.policy.ASSIGNMENTS`, written with compare-and-swap); every replica of a slot
reads it there and loads the adapter's current merged version (every replica re-reads it each refresh
interval, a watch kept running by Serve's health checks and metric calls), so a slot changes adapter
without a redeploy. A replica that Serve adds or restarts reads its assignment and loads it in its
constructor, before Serve routes it a request: it never answers its slot's adapter with
ModelUnavailable for want of a load (requests that reach a slot starting from zero wait for it). The
controller routes an adapter to a slot once one replica serves it; with more replicas, one that was
already running when the slot moved on answers ModelUnavailable until it has loaded, and the gateway
falls back meanwhile.

A slot answers only for the adapter the caller names: a request that reaches it after it moved on gets
:class:`~deployments.models.merged.ModelUnavailable`, and the gateway falls back to dynamic (answered once).
"""

from __future__ import annotations

import asyncio
import time

from deployments.messages import MergedStatus
from deployments.models.merged import _MergedBase
from deployments.observability import request_logger
from deployments.promotion.autoscaling import SLOT_HELD
from deployments.promotion.policy import Assignment, read_assignments
from deployments.settings import SlotSettings

__all__ = ["SERVED_STATES", "MergedSlot"]

logger = request_logger("slots")  # under ray.serve: in the replica's log, with its ids

#: States in which a slot holds its adapter: loading it, serving it, or draining what it still runs.
SERVED_STATES = ("loading", "ready", "draining")


class MergedSlot(_MergedBase[SlotSettings]):
    """One promotion slot: serves the merged model of whichever adapter its assignment names."""

    def _start(self) -> None:
        """Read the assignment and load what it names before the replica reports ready, so Serve routes
        nothing to it before it serves its assignment; blocking, as MergedModel's own load. A store that
        cannot be read or a version that fails to load leaves the replica empty (ModelUnavailable: the
        gateway falls back), and its watch tries again."""
        super()._start()
        self._poll: asyncio.Task[None] | None = None
        # whether the stored assignments give this slot an adapter, as read last; until they are read,
        # held (a replica that cannot tell must not let Serve scale away what it may be serving)
        self.held = True
        k = self.settings.slot
        try:
            adapter = self._served(self._assignment())
            version = self.storage.current_version("merged", adapter) if adapter else None
            if adapter is not None and version is not None:
                self._install(self._open(adapter, version))
            elif adapter is not None:
                logger.warning("slot %d: %s has no published merged version yet", k, adapter)
            self._checked = time.monotonic()  # read just now: the watch's first look is a refresh later
        except Exception as e:  # the watch's first look reads and loads again
            logger.error("slot %d: assignment not loaded at start (%s); the watch tries again", k, e)

    def _assignment(self) -> Assignment | None:
        """This slot's stored assignment; blocking."""
        k = self.settings.slot
        return read_assignments(self.storage, k + 1).slots[k]

    def _served(self, a: Assignment | None) -> str | None:
        """The adapter an assignment asks this replica to hold (none while it is being merged), noting whether
        the slot is assigned at all (what :meth:`record_autoscaling_stats` reports)."""
        self.held = a is not None
        return a.adapter if a is not None and a.state in SERVED_STATES else None

    async def _wanted(self) -> str | None:
        try:
            a = await asyncio.to_thread(self._assignment)
        except Exception as e:  # unreadable or invalid: keep what is served until it can be read again
            k = self.settings.slot
            logger.error("slot %d: assignments unreadable (%s); still serving %s", k, e, self.adapter)
            return self.adapter
        return self._served(a)

    def _watch(self) -> None:
        """Re-read the assignment every refresh interval, requests or not (a freed slot lets its engine
        go; an assigned one loads before its first request)."""
        if self._poll is not None and not self._poll.done():
            return

        async def poll() -> None:
            while True:
                await self._refresh()
                await asyncio.sleep(max(0.1, self.settings.batching.refresh_interval_s))

        self._poll = asyncio.create_task(poll())

    async def check_health(self) -> None:  # type: ignore[override]
        """Serve calls it every few seconds on every replica (on the replica's loop): it also keeps the
        assignment watch running, so a replica Serve adds or restarts follows its slot by itself."""
        self._watch()
        super().check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics, asked every few seconds on the replica's loop: whether the
        slot is assigned (:mod:`deployments.promotion.autoscaling` keeps a replica while it is). It also keeps
        the watch running, so what it reports follows the stored assignments."""
        self._watch()
        return {SLOT_HELD: 1.0 if self.held else 0.0}

    async def status(self) -> MergedStatus:  # type: ignore[override]
        """What this replica serves; asking starts its watch (the controller asks while it waits)."""
        self._watch()
        await self._refresh()
        return MergedStatus(self.adapter, self.version, self.engine is not None and self.stale is None)
