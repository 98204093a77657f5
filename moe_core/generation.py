"""What a generation asks for, shared by the engine and the deployments: one chat turn and one row's
sampling settings.

Plain data with no torch or PIL import, so the gateway's process (which builds requests but runs no
model) loads no model code; the engine's modules import these from here, and Ray pickles them between
replicas as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from moe_core.structured import Constraint

__all__ = ["MAX_TOP_LOGPROBS", "Role", "SamplingParams", "Turn"]

#: The most alternatives a row may ask to be reported per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

#: Who speaks a turn: ``tool`` is a tool's result.
Role = Literal["system", "user", "assistant", "tool"]

#: What stands for an image in a turn: an ``int`` index into the request's images on the wire (the
#: gateway sends them encoded, once), the decoded ``PIL.Image`` in the engine.
ImageT = TypeVar("ImageT")


@dataclass(frozen=True)
class Turn(Generic[ImageT]):
    """One chat message: ``parts`` are text (``str``) and images (``ImageT``), in order.

    ``Turn[int]`` crosses the handles (``Query.turns``, each image an index into ``Query.images``); the
    replica decodes the images into the ``Turn[Image.Image]`` the engine renders.
    """

    role: Role
    parts: tuple[str | ImageT, ...]
    tool_calls: tuple[tuple[str, str], ...] = ()  # an assistant's calls: (function name, arguments JSON)
    inline: bool = False  # the text is the server's own (its system prompt): rendered in the template as is


@dataclass(frozen=True)
class SamplingParams:
    """One row's generation settings; the defaults are greedy decoding up to the engine's limit.

    Checked when made (a ``ValueError`` naming the field first), so the gateway refuses a bad value
    before any hop and the engine never sees one.
    """

    max_tokens: int | None = None  # None: the engine's max_new_tokens
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # with temperature > 0: the same seed, the same text
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    min_tokens: int = 0  # end of sequence is ignored before this many tokens (benchmarks' fixed lengths)
    ignore_eos: bool = False  # end of sequence is ignored until max_tokens (unless a grammar ends the row)
    top_k: int = 0  # 0: off; else sample among the k most likely tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and answer (CTRL's, as vLLM)
    presence_penalty: float = 0.0  # subtracted from tokens the answer holds (OpenAI's)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the answer (OpenAI's)
    constraint: Constraint | None = None  # the answer's grammar
    logprobs: int | None = None  # None: none; k: the chosen token's log probability and the k best
    # Whether the answering expert's declared grammar applies when ``constraint`` is None: read by the
    # model deployment, which fills ``constraint`` in from it before the engine runs (the engine ignores it).
    expert_grammar: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be within 0..2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be within (0, 2], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be within -2..2, got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be within 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must not be negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty, self.presence_penalty, self.frequency_penalty) != (1.0, 0.0, 0.0)

    def blocks_eos(self, generated: int) -> bool:
        """Whether the end of sequence may not be picked after ``generated`` tokens."""
        return self.ignore_eos or generated < self.min_tokens
