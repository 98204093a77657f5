"""What crosses a deployment handle: small frozen values, never dicts read back by string keys.

Ray pickles them between replicas; none holds a model or a Ray object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from deployments.routing import Classification, Decision, Mode, RoutingPolicy
from moe_core.answers import Completion, Delta, FinishReason, TokenLogprob
from moe_core.generation import SamplingParams, Turn
from moe_core.vision import PixelBounds

__all__ = [
    "Answer",
    "Chunk",
    "Classification",
    "DynamicStats",
    "FinishReason",
    "MergedStatus",
    "Mode",
    "Query",
    "RouteRequest",
    "RouteResult",
    "SamplingParams",
    "TokenLogprob",
    "Turn",
]


@dataclass(frozen=True)
class Query:
    """One request as the model deployments get it: validated at the gateway, images still encoded.

    ``/infer`` sends one screenshot and one instruction (``image``, ``prompt``); the chat API may send a
    whole conversation (``turns``, whose images are ``images``), which then replaces the default
    "system prompt, then the user's image and prompt". ``image`` is the screenshot the routing adapter
    classifies (the conversation's last image); ``image_tokens`` counts all images at ``bounds``.
    """

    image: bytes | None  # the screenshot file, verified readable; None: a conversation without images
    prompt: str
    bounds: PixelBounds  # the pixels the model sees of each image: the config's, narrowed by the request
    image_tokens: int  # what the images cost in the prompt at those bounds, known before any batch
    request_id: str = ""  # Serve's request id (the client's X-Request-Id), for log lines in every hop
    sampling: SamplingParams = field(default_factory=SamplingParams)
    turns: tuple[Turn[int], ...] = ()  # a whole conversation (chat API); empty: ``image`` + ``prompt``
    images: tuple[bytes, ...] = ()  # the conversation's images, in order of appearance
    tools: str | None = None  # the functions the model may call, as JSON text (rendered by its template)


@dataclass(frozen=True, kw_only=True)
class Answer(Completion):
    """One generated answer: the engine's :class:`~moe_core.answers.Completion` and who answered (the
    merged or the dynamic deployment, its adapter and version)."""

    adapter: str | None  # None: the bare base model
    mode: Mode
    version: str | None  # the merged model's or the adapter's version that answered
    replica_s: float = 0.0  # time in the answering replica's method (Server-Timing: replica)

    @property
    def engine_s(self) -> float:
        """Of ``replica_s``, the engine's: submission to the last token (Server-Timing: engine)."""
        return self.timings.total_s

    @classmethod
    def of(
        cls,
        done: Completion,
        adapter: str | None,
        mode: Mode,
        version: str | None,
        replica_s: float = 0.0,
        **engine: Any,
    ) -> Answer:
        """``done`` as the answer of ``adapter``; ``engine`` overrides some of its fields (a merged
        model's batch has one adapter, whatever its engine counted)."""
        fields_ = _engine_fields(done) | engine
        return cls(**fields_, adapter=adapter, mode=mode, version=version, replica_s=replica_s)


@dataclass(frozen=True, kw_only=True)
class Chunk(Delta):
    """One piece of a streamed answer: the engine's :class:`~moe_core.answers.Delta` (new ``text``; the
    last one has ``finish_reason`` and the usage) and who answered."""

    adapter: str | None
    mode: Mode
    version: str | None

    @classmethod
    def of(cls, piece: Delta | Completion, adapter: str | None, mode: Mode, version: str | None) -> Chunk:
        """``piece`` as a chunk: a delta, or a whole answer as the one and last chunk of a stream."""
        return cls(**_engine_fields(piece), adapter=adapter, mode=mode, version=version)


#: The engine's field names of a delta and of a completion, read once (a chunk is made per token).
_DELTA_FIELDS = tuple(f.name for f in fields(Delta))
_COMPLETION_FIELDS = tuple(f.name for f in fields(Completion))


def _engine_fields(piece: Delta | Completion) -> dict[str, Any]:
    """The engine's fields of ``piece`` (a delta's or a completion's, which have the same names), not
    copied, and none of who answered when ``piece`` is already an answer or a chunk."""
    names = _DELTA_FIELDS if isinstance(piece, Delta) else _COMPLETION_FIELDS
    return {name: getattr(piece, name) for name in names}


@dataclass(frozen=True)
class RouteRequest:
    """Classify ``image`` with the routing adapter, decide, and answer in place when the decision says dynamic."""

    query: Query
    policy: RoutingPolicy  # the gateway's snapshot: the decision uses its rules and values
    prefer_merged: bool | None = None


@dataclass(frozen=True)
class RouteResult:
    decision: Decision
    answer: Answer | None  # set when the dynamic deployment answered in place (no second hop)


@dataclass(frozen=True)
class MergedStatus:
    adapter: str | None  # None: a promotion slot with nothing assigned
    version: str | None  # the published merged version the replica serves; None: nothing published
    ready: bool


@dataclass(frozen=True)
class DynamicStats:
    """Batching and adapter-cache counters of one dynamic replica."""

    pid: int
    answered: int  # requests answered
    answers_by_batch_size: Mapping[int, int]  # the most rows in a step while a request ran -> requests
    answers_by_adapters_in_step: Mapping[int, int]  # the most distinct adapters in such a step -> requests
    max_adapters_in_one_step: int
    resident: Mapping[str, str]  # adapter -> version, least recently used first
    capacity: int
    loads: int
    evictions: int
    served: tuple[str, ...]
    images_decoded: int = 0  # images this replica decoded (each once, however many steps read it)
