"""Merged-model deployments: the pinned :class:`MergedModel`, bound once per merged adapter by the app
builder, and (in :mod:`deployments.promotion.slots`) the promotion slots, which share everything here but whose
adapter changes with their assignment.

Each replica loads the current published version from ``merged/<name>/`` and answers through the
engine's continuous-batching scheduler (``generate``, or ``stream`` as a Ray Serve streaming method);
a newer published version is picked up without a restart, in the background. With nothing
published it stays up and answers :class:`ModelUnavailable`, so the gateway can fall back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from deployments.messages import Answer, Chunk, MergedStatus, Query
from deployments.models.engines import (
    DeploymentEngine,
    ModelDeployment,
    answer_of,
    engine_refusal,
    engine_stats,
)
from deployments.observability import MergedMetrics
from deployments.settings import FullModelSettings, MergedSettings, ModelSettings
from moe_core.engine import GenerationRequest
from moe_core.generation import SamplingParams

__all__ = ["FullModel", "MergedModel", "ModelUnavailable"]

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=ModelSettings)


class ModelUnavailable(RuntimeError):
    """This merged deployment has no published model to serve."""


@dataclass(frozen=True)
class _Loaded:
    """A merged model opened off the event loop, to be put in service on it (:meth:`_MergedBase._install`)."""

    adapter: str
    version: str
    engine: DeploymentEngine
    source: dict[str, Any]  # its merge metadata
    stale: str | None
    seconds: float


class _MergedBase(ModelDeployment[S]):
    """A deployment serving one merged adapter at a time: the pinned :class:`MergedModel`, or a
    promotion slot (:class:`deployments.promotion.slots.MergedSlot`) whose adapter changes without a redeploy.

    What it serves (adapter, version, engine) changes only on the event loop, in :meth:`_install`, with no
    await in between: a request reads the three together and never pairs one adapter's name with another's
    engine."""

    def expected_errors(self) -> dict[type[BaseException], int]:
        return super().expected_errors() | {ModelUnavailable: logging.WARNING}  # the gateway falls back

    def _start(self) -> None:
        self.adapter: str | None = None
        self.metrics = MergedMetrics()
        self.engine: DeploymentEngine | None = None
        self.version: str | None = None
        self._checked = 0.0
        self._swap = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.source: dict[str, Any] = {}  # the served version's merge metadata
        self.stale: str | None = None  # why the served version no longer matches the published adapter

    @abstractmethod
    async def _wanted(self) -> str | None:
        """The adapter this replica should serve now (None: none)."""

    def _open(self, adapter: str, version: str) -> _Loaded:
        """Fetch (verified against its manifest) and load ``adapter``'s merged ``version``; blocking."""
        t0 = time.perf_counter()
        path, _ = self.storage.fetch("merged", adapter, version)
        try:
            meta = json.loads((path / "merge_metadata.json").read_text())
        except (OSError, ValueError):
            meta = {}
        engine = self.make_engine(path, f"merged-{adapter}")
        return _Loaded(
            adapter, version, engine, meta, self._staleness(adapter, meta), time.perf_counter() - t0
        )

    def _install(self, new: _Loaded) -> None:
        old, old_adapter, old_version = self.engine, self.adapter, self.version
        self.engine, self.adapter, self.version, self.source = (
            new.engine,
            new.adapter,
            new.version,
            new.source,
        )
        self._set_stale(new.stale)
        _retire(old)
        if old_adapter is not None and old_adapter != new.adapter:  # a promotion slot moved on: the node
            self._release_storage(old_adapter)  # cache may evict what it served (once unused)
        self.metrics.serving(
            new.adapter, new.version, old_version if old_adapter == new.adapter else None, new.seconds
        )
        logger.info("merged %s: serving version %s (loaded in %.2fs)", new.adapter, new.version, new.seconds)

    def _release(self) -> None:
        """Serve nothing (a promotion slot that was freed): the engine's running rows finish, then it is
        dropped; the node cache may evict the version once no process uses it."""
        old, adapter = self.engine, self.adapter
        self.engine, self.adapter, self.version, self.source, self.stale = None, None, None, {}, None
        _retire(old)
        if adapter is not None:
            self._release_storage(adapter)
        logger.info("promotion slot: released %s", adapter)

    def _release_storage(self, adapter: str) -> None:
        release = getattr(self.storage, "release", None)  # a test's fake store may have none
        if release is not None:
            release("merged", adapter)

    def _staleness(self, adapter: str, meta: dict[str, Any]) -> str | None:
        """Why a merged model is stale, or None: built from another adapter version than the one now
        published (or from another base model). Dynamic answers then, so the two never disagree."""
        from moe_core.modeling import base_model_id

        base = base_model_id(self.settings.engine.base_model)
        if meta.get("base_model") not in (None, base):
            return f"merged from base {meta.get('base_model')}, not {base}"
        merged_from = meta.get("source_version")
        current = self.storage.current_version("expert", adapter)
        if merged_from is not None and current is not None and merged_from != current:
            # the same weights republished under a new version are not stale (the merge job keeps the
            # merged version it has for them)
            digest = meta.get("source_adapter_sha256")
            if not digest or digest != self._adapter_digest(adapter, current):
                return f"merged from adapter version {merged_from}; {current} is published"
        return None

    def _adapter_digest(self, adapter: str, version: str) -> str | None:
        try:
            meta = self.storage.read_json("expert", adapter, "deploy_metadata.json", version)  # type: ignore[attr-defined]
        except Exception:  # unreadable metadata: treated as a different adapter (stale, dynamic answers)
            return None
        digest = meta.get("adapter_sha256")
        return digest if isinstance(digest, str) else None

    def _set_stale(self, stale: str | None) -> None:
        if stale != self.stale:
            (logger.warning if stale else logger.info)(
                "merged %s: %s",
                self.adapter,
                f"stale ({stale}): requests fall back" if stale else "up to date",
            )
        self.stale = stale

    async def _refresh(self) -> None:
        """Look for a new version now and then, in the background: requests never wait for a load."""
        if time.monotonic() - self._checked < self.settings.batching.refresh_interval_s:
            return
        if self._swap.locked():
            return
        self._checked = time.monotonic()
        self._task = asyncio.create_task(self._check())

    async def _check(self) -> None:
        async with self._swap:
            try:
                adapter = await self._wanted()
                if adapter is None:
                    if self.adapter is not None:
                        self._release()
                    return
                current = await asyncio.to_thread(self.storage.current_version, "merged", adapter)
                if current is not None and (current != self.version or adapter != self.adapter):
                    if self.adapter is not None and adapter != self.adapter:
                        self._release()  # never two models at once; the new one's requests fall back meanwhile
                    self._install(await asyncio.to_thread(self._open, adapter, current))
                elif self.engine is not None and adapter == self.adapter:
                    self._set_stale(await asyncio.to_thread(self._staleness, adapter, self.source))
            except Exception as e:  # storage unreadable or a version that fails to verify: keep serving
                logger.error(
                    "merged %s: refresh failed (%s); still serving %s", self.adapter, e, self.version
                )

    async def _prepare(
        self, query: Query, adapter: str | None
    ) -> tuple[DeploymentEngine, str, str | None, GenerationRequest, SamplingParams]:
        """The engine, the adapter it serves and its version, read together (a promotion slot changes
        adapter), and the request; refuses when this replica does not serve ``adapter`` (None: whatever it
        serves)."""
        await self._refresh()
        engine, served, version = self.engine, self.adapter, self.version
        if adapter is not None and adapter != served:
            raise ModelUnavailable(f"merged deployment serves {served!r}, not {adapter!r}")
        if self.stale is not None:
            raise ModelUnavailable(f"merged deployment {served!r} is stale: {self.stale}")
        if engine is None or served is None:
            raise ModelUnavailable(f"merged deployment {served!r} has no published model")
        request, params = self.request(query, None, expert=served)
        return engine, served, version, request, params

    async def generate(self, query: Query, adapter: str | None = None) -> Answer:
        """The whole answer; ``adapter`` names the adapter the caller expects (a promotion slot may have
        moved on)."""
        t0 = time.perf_counter()
        engine, served, version, request, params = await self._prepare(query, adapter)
        try:
            done = await engine.generate(request, params, request_id=query.request_id)
        except Exception as e:
            raise engine_refusal(e, self.metrics.rejected.inc) from e
        self.metrics.finished(
            "merged", served, query.request_id, done.timings, done.prompt_tokens, done.completion_tokens
        )
        self.metrics.engine_state(engine_stats(engine))
        return answer_of(done, served, "merged", version, 1, t0)

    async def stream(self, query: Query, adapter: str | None = None) -> AsyncIterator[Chunk]:
        """The answer as it is decoded (Ray Serve streaming: ``handle.options(stream=True)``)."""
        engine, served, version, request, params = await self._prepare(query, adapter)
        try:
            async for d in engine.stream(request, params, request_id=query.request_id):
                if d.timings is not None:
                    self.metrics.finished(
                        "merged", served, query.request_id, d.timings, d.prompt_tokens, d.completion_tokens
                    )
                    self.metrics.engine_state(engine_stats(engine))
                yield Chunk.of(d, served, "merged", version)
        except Exception as e:
            raise engine_refusal(e, self.metrics.rejected.inc) from e

    def status(self) -> MergedStatus:
        return MergedStatus(self.adapter, self.version, self.engine is not None and self.stale is None)

    def check_health(self) -> None:
        """Unhealthy when the engine cannot run (its device fails, its scheduler thread died); a replica
        with nothing published is healthy (it answers ModelUnavailable and the gateway falls back)."""
        if self.engine is not None:
            self.engine.check_health()


class MergedModel(_MergedBase[MergedSettings]):
    """The merged deployment of one pinned adapter (``merged.adapters`` in the config)."""

    def _start(self) -> None:
        super()._start()
        adapter = self.settings.adapter
        self.adapter = adapter
        version = self.storage.current_version("merged", adapter)
        if version is None:
            logger.warning("merged %s: no published version; requests fall back", adapter)
        else:
            self._install(self._open(adapter, version))

    async def _wanted(self) -> str | None:
        return self.settings.adapter


class FullModel(_MergedBase[FullModelSettings]):
    """A further full model (config ``models``, e.g. chandra): the merged-model deployment serving a
    checkpoint of its own. Published in storage under ``merged/<name>/`` (a new version is picked up as a
    merged model's is), or a Hugging Face id or folder, loaded once at start. Never stale (no adapter stands
    behind it), and nothing falls back to the dynamic deployment for it."""

    def _start(self) -> None:
        super()._start()
        name = self.adapter = self.settings.name
        if not self.settings.from_storage:
            t0 = time.perf_counter()
            engine = self.make_engine(None, f"model-{name}")
            self._install(_Loaded(name, "checkpoint", engine, {}, None, time.perf_counter() - t0))
            return
        version = self.storage.current_version("merged", name)
        if version is None:
            logger.warning("model %s: no published version in storage (merged/%s/)", name, name)
        else:
            self._install(self._open(name, version))

    async def _wanted(self) -> str | None:
        return self.settings.name

    def _staleness(self, adapter: str, meta: dict[str, Any]) -> str | None:
        return None

    async def _refresh(self) -> None:
        if self.settings.from_storage:  # a checkpoint named in the config is loaded once
            await super()._refresh()


def _retire(engine: DeploymentEngine | None) -> None:
    """Close a replaced engine's scheduler once its running rows are done (its thread ends when idle)."""
    close = getattr(getattr(engine, "scheduler", None), "close", None)
    if close is not None:
        close_when_idle(engine, close)


def close_when_idle(engine: Any, close: Any) -> None:
    """Close a replaced engine's scheduler once its queued and running requests are done."""

    def wait() -> None:
        sched = engine.scheduler
        while sched.queued or sched.running:
            time.sleep(0.05)
        close()

    threading.Thread(target=wait, name="close-old-engine", daemon=True).start()
