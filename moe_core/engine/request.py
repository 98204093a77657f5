"""What goes into the engine and what comes out: requests, results, errors, and the model protocols."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from moe_core.answers import Classification, Completion, Delta, Timings
from moe_core.generation import Turn
from moe_core.vision import PixelBounds

__all__ = [
    "BASE",
    "ChatProcessor",
    "Classification",
    "Completion",
    "Delta",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "InvalidInput",
    "PromptTooLong",
    "QueueFull",
    "Timings",
    "Turn",
    "VisionLanguageModel",
]

#: PEFT's name for "no adapter" in a mixed batch.
BASE = "__base__"


class EngineError(RuntimeError):
    """A request the engine cannot run (unknown adapter, bad input)."""


class InvalidInput(EngineError):
    """A request the engine refuses for one of its fields (``param``, as the request names it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.message = param, message


class PromptTooLong(EngineError):
    """A prompt over the engine's token limit (its images' tokens and the chat template included), or
    one that would not fit the KV cache even alone."""


class QueueFull(RuntimeError):
    """The replica's queue is full: the request is refused at once (a 503 with a retry hint)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One row: ``image`` and ``prompt`` after the system prompt, or a whole conversation (``turns``,
    the engine's system prompt first when it has none of its own)."""

    image: Image.Image | None
    prompt: str
    adapter: str | None = None
    max_new_tokens: int | None = None
    bounds: PixelBounds | None = None  # this row's images' pixel bounds; None: the engine's
    turns: tuple[Turn[Image.Image], ...] = ()
    image_key: str | None = None  # names the image's content (a hash of its file): saves hashing pixels
    tools: str | None = None  # the functions the model may call (OpenAI's ``tools``, as JSON text)

    def conversation(self, system: str) -> tuple[Turn[Image.Image], ...]:
        if not self.turns:
            image = (self.image,) if self.image is not None else ()
            return (Turn("system", (system,), inline=True), Turn("user", (*image, self.prompt)))
        if self.turns[0].role == "system":
            return self.turns
        return (Turn("system", (system,), inline=True), *self.turns)

    @property
    def images(self) -> list[Image.Image]:
        if not self.turns:
            return [self.image] if self.image is not None else []
        return [p for t in self.turns for p in t.parts if isinstance(p, Image.Image)]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    adapter: str | None
    num_tokens: int
    batch_size: int
    adapters_in_batch: int
    latency_s: float
    prompt_tokens: int = 0  # the row's prompt, image tokens and chat template included


class VisionLanguageModel(Protocol):
    """What the engine uses of a transformers image-text-to-text model (bare, PEFT-wrapped or merged)."""

    def __call__(self, **inputs: Any) -> Any: ...
    def generate(self, **inputs: Any) -> torch.Tensor: ...
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...
    def eval(self) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...
    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any: ...


class ChatProcessor(Protocol):
    """What the engine uses of a transformers processor: its tokenizer, chat template and batching."""

    tokenizer: Any

    def __call__(self, **kwargs: Any) -> Any: ...
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...
    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any: ...
