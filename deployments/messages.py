"""What crosses a deployment handle: small frozen values, never dicts read back by string keys.

Ray pickles them between replicas; none holds a model or a Ray object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deployments.routing import Classification, Decision, RoutingPolicy
from deployments.schemas import Mode
from moe_core.answers import FinishReason, TokenLogprob
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


@dataclass(frozen=True)
class Answer:
    """One generated answer, from the merged or the dynamic deployment."""

    text: str
    adapter: str | None  # None: the bare base model
    mode: Mode
    version: str | None  # the merged model's or the adapter's version that answered
    batch_size: int  # rows in the forward that generated it
    adapters_in_batch: int  # distinct adapters in that forward
    prompt_tokens: int  # the prompt as the model read it: chat template and image tokens included
    completion_tokens: int
    finish_reason: FinishReason = "stop"  # stop: end of sequence or a stop string; length: max_tokens
    ttft_s: float | None = None  # from arrival at the deployment to the first token
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: tuple[TokenLogprob, ...] = ()  # the answer's tokens, when the request asked
    replica_s: float = 0.0  # time in the answering replica's method (Server-Timing: replica)
    engine_s: float = 0.0  # of which in the engine, from submission to the last token (Server-Timing: engine)


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed answer: new ``text``; the last chunk has ``finish_reason`` and the usage."""

    text: str
    adapter: str | None
    mode: Mode
    version: str | None
    finish_reason: FinishReason | None = None  # set on the last chunk only
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated so far
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # this chunk's tokens, when the request asked


@dataclass(frozen=True)
class RouteRequest:
    """Classify ``image`` with the routing adapter, decide, and answer in place when the decision says dynamic."""

    query: Query
    policy: RoutingPolicy  # the gateway's snapshot: the decision uses its rules and values
    prefer_merged: bool | None = None
    answer_in_place: bool = True  # False: decide only (a streamed request is answered by a stream call)


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
