"""What an answer carries besides its text, shared by the engine and the HTTP edge: why it ended, its
tokens' log probabilities, and where its time went; and a classification (the routing adapter's verdict).

Plain data with no torch import, so the gateway's process (which only formats answers) loads no model
code; the engine's modules import these from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Classification", "FinishReason", "Timings", "TokenLogprob"]

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
