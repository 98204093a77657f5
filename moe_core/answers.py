"""What the engine answers, shared by the engine, the deployments and the HTTP edge: a whole answer
(:class:`Completion`) or a streamed piece of one (:class:`Delta`), with why it ended, its tokens' log
probabilities and where its time went; and a classification (the routing adapter's verdict).

Plain data with no torch import, so the gateway's process (which only formats answers) loads no model
code; the engine's modules import these from here, and the deployments' answers extend them with who
answered (``deployments.messages.Answer``, ``Chunk``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Classification", "Completion", "Delta", "FinishReason", "Timings", "TokenLogprob"]

#: Why a row ended: ``stop`` (end of sequence or a stop string) or ``length`` (its token limit).
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability, and the most likely tokens at its place (OpenAI's logprobs)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class Timings:
    """Where one request's time went, measured in the replica (seconds)."""

    queued_s: float  # submitted -> its first step
    ttft_s: float  # submitted -> first token
    total_s: float  # submitted -> last token
    tpot_s: float  # time per output token after the first (0 with one token)


@dataclass(frozen=True)
class Classification:
    """A classifier's verdict (the routing adapter's on one screenshot): the engine returns it, the
    routing rules read it."""

    label: str  # the best label: for the routing adapter, the adapter name it chose
    confidence: float  # its probability
    scores: Mapping[str, float] = field(default_factory=dict)  # every label's probability


@dataclass(frozen=True)
class Delta:
    """New text of one request; the last delta has ``finish_reason`` and the timings."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0  # rows in the step that produced it
    adapters_in_batch: int = 0
    timings: Timings | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens since the last delta (when the row asked)


@dataclass(frozen=True)
class Completion:
    """A whole answer (the deltas of ``Scheduler.stream`` joined)."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    batch_size: int  # most rows in a step while it ran
    adapters_in_batch: int
    timings: Timings
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
