"""The engine as the deployments see it: a protocol, and the factory that makes the real one; and
:class:`ModelDeployment`, what every model deployment shares (a query made the engine's request: its
images decoded once, its conversation built, the expert's grammar filled in; an engine's refusal as the
client's error; the replica's :class:`~deployments.messages.Answer`).

Deployments take an ``engine_factory`` so their logic (batching, fallback, refresh, reconfigure) is
unit-tested with a fake engine and no model; production and the end-to-end tests use :func:`load_engine`.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from deployments.errors import BadInput
from deployments.images import DecodedImages
from deployments.messages import Answer
from deployments.models.adapter_cache import AdapterStore
from deployments.observability import quiet_expected_errors
from deployments.routing import Mode
from moe_core.config import EngineSettings
from moe_core.engine import Classification, Engine, GenerationRequest, InvalidInput, Turn
from moe_core.engine.request import Completion, Delta, PromptTooLong, QueueFull
from moe_core.engine.scheduler import Scheduler
from moe_core.generation import SamplingParams
from moe_core.storage.store import Storage

if TYPE_CHECKING:
    from deployments.messages import Query
    from deployments.settings import ModelSettings

__all__ = [
    "DeploymentEngine",
    "EngineFactory",
    "ModelDeployment",
    "ScheduledEngine",
    "engine_refusal",
    "engine_stats",
    "load_engine",
]


class DeploymentEngine(Protocol):
    """What a deployment calls on its engine: :class:`ScheduledEngine` (the real engine behind its
    continuous-batching scheduler) satisfies it; unit tests pass a fake."""

    def stream(
        self, request: GenerationRequest, params: SamplingParams, *, request_id: str = ""
    ) -> AsyncIterator[Delta]: ...
    async def generate(
        self, request: GenerationRequest, params: SamplingParams, *, request_id: str = ""
    ) -> Completion: ...
    async def classify(
        self, request: GenerationRequest, labels: Sequence[str], *, request_id: str = ""
    ) -> Classification: ...
    def load_adapter(self, name: str, path: str | Path) -> None: ...
    def set_lora_slots(self, slots: int, max_rank: int) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def in_use(self) -> set[str]: ...
    def check_health(self) -> None: ...


class ScheduledEngine:
    """An :class:`~moe_core.engine.Engine` behind its :class:`~moe_core.engine.scheduler.Scheduler`: requests
    join the running batch per decode step; adapter loads run between steps (the engine's lock)."""

    def __init__(self, engine: Engine, max_running: int, max_queued: int) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine, max_running=max_running, max_queued=max_queued)
        self.stream = self.scheduler.stream
        self.generate = self.scheduler.generate
        self.classify = self.scheduler.classify
        self.in_use = self.scheduler.in_use
        self.load_adapter = engine.load_adapter
        self.unload_adapter = engine.unload_adapter
        self.set_lora_slots = engine.set_lora_slots

    def check_health(self) -> None:
        """Raise when this engine cannot serve: its scheduler thread died, or its device fails a tiny op."""
        if not self.scheduler.healthy():
            raise RuntimeError(f"{self.engine.name}: the scheduler thread is not running")
        self.engine.check_device()


def engine_refusal(e: Exception, on_queue_full: Callable[[], None]) -> Exception:
    """What the engine refused, as the client's error: a prompt too long (over ``limits.max_prompt_tokens``,
    checked once, by the engine's scheduler where the prompt is tokenized, or too large for the KV cache)
    and invalid text are 4xx naming the prompt; a full queue stays itself (a 503)."""
    if isinstance(e, QueueFull):
        on_queue_full()
        return e
    if isinstance(e, PromptTooLong):
        return BadInput("prompt", str(e), 413)
    if isinstance(e, UnicodeEncodeError):
        return BadInput("prompt", f"prompt is not valid unicode ({e.reason} at position {e.start})")
    if isinstance(e, InvalidInput):  # a grammar that does not compile, special-token text in tools
        return BadInput(e.param or "prompt", e.message, 400)
    return e


def answer_of(
    done: Completion,
    adapter: str | None,
    mode: Mode,
    version: str | None,
    adapters_in_batch: int,
    started: float,
) -> Answer:
    """A replica's :class:`Answer` from the engine's completion; ``started``: when the replica's method began."""
    replica_s = time.perf_counter() - started
    return Answer.of(done, adapter, mode, version, replica_s, adapters_in_batch=adapters_in_batch)


def engine_stats(engine: object) -> dict[str, int]:
    """The scheduler's queue, rows and KV cache pages of a :class:`ScheduledEngine` (a fake has none)."""
    sched = getattr(engine, "scheduler", None)
    return sched.stats() if isinstance(sched, Scheduler) else {}


#: (engine settings, model folder or None for the base model, engine name, rows, queue) -> engine
EngineFactory = Callable[[EngineSettings, Path | None, str, int, int], DeploymentEngine]


def load_engine(
    settings: EngineSettings, path: Path | None, name: str, max_running: int, max_queued: int
) -> DeploymentEngine:
    return ScheduledEngine(Engine.load(settings, path, name=name), max_running, max_queued)


S = TypeVar("S", bound="ModelSettings")


class ModelDeployment(ABC, Generic[S]):
    """What the dynamic and merged deployments share: typed settings, an injectable engine factory and
    store, and the translation of a :class:`~deployments.messages.Query` into an engine request.
    Subclasses set themselves up in :meth:`_start`."""

    def __init__(
        self, settings: S, *, engine_factory: EngineFactory = load_engine, storage: AdapterStore | None = None
    ) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.storage: AdapterStore = storage or Storage.from_config(settings.storage)
        self.images = DecodedImages()  # each image decoded once in this process (routing, then the answer)
        quiet_expected_errors(self.expected_errors())
        self._start()

    def expected_errors(self) -> dict[type[BaseException], int]:
        """What this replica raises for the client's request (logged at INFO) or for a condition the
        gateway answers itself (WARNING), instead of Serve's ERROR with a traceback."""
        return {BadInput: logging.INFO, QueueFull: logging.WARNING}

    def make_engine(self, path: Path | None, name: str) -> DeploymentEngine:
        s = self.settings
        return self.engine_factory(s.engine, path, name, s.max_batch_size, s.max_queued_requests)

    @abstractmethod
    def _start(self) -> None:
        """Set up the deployment's own state (engine, caches) once settings and store are in place."""

    def request(
        self, query: Query, adapter: str | None, *, expert: str | None = None
    ) -> tuple[GenerationRequest, SamplingParams]:
        """The engine's request for ``query``: images decoded, the conversation built, sampling checked.
        ``expert`` (default ``adapter``) is the expert answering, whose declared grammar applies when the
        query brings none (a merged model answers for its adapter with no adapter of its own)."""
        images = [self.images.open(b)[0] for b in query.images]
        turns = tuple(
            Turn(
                t.role,
                tuple(p if isinstance(p, str) else images[p] for p in t.parts),
                tool_calls=t.tool_calls,
            )
            for t in query.turns
        )
        image, key = self.images.open(query.image) if query.image is not None and not turns else (None, None)
        request = GenerationRequest(
            image,
            query.prompt,
            adapter,
            bounds=query.bounds,
            turns=turns,
            image_key=None if turns else key,
            tools=query.tools,
        )
        s = query.sampling  # its max_tokens is within limits.max_completion_tokens: the gateway checked it
        if s.constraint is None and s.expert_grammar:  # the expert's declared grammar
            s = replace(s, constraint=self.settings.output_constraint(expert or adapter))
        return request, s
