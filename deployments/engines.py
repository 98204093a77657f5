"""The engine as the deployments see it: a protocol, and the factory that makes the real one.

Deployments take an ``engine_factory`` so their logic (batching, fallback, refresh, reconfigure) is
unit-tested with a fake engine and no model; production and the end-to-end tests use :func:`load_engine`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from PIL import Image

from deployments.adapter_cache import AdapterStore
from deployments.schemas import BadInput
from moe_core.config import EngineSettings
from moe_core.engine import ClassifyResult, Engine, GenerationRequest, GenerationResult
from moe_core.storage import Storage
from moe_core.vision import PixelBounds

if TYPE_CHECKING:
    from deployments.messages import Query
    from deployments.settings import ModelSettings

__all__ = ["DeploymentEngine", "EngineFactory", "ModelDeployment", "load_engine"]


class DeploymentEngine(Protocol):
    """What a deployment calls on its engine (:class:`moe_core.engine.Engine` satisfies it)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...
    def classify(
        self,
        image: Image.Image,
        prompt: str,
        labels: Sequence[str],
        adapter: str | None,
        system_prompt: str = "",
        bounds: PixelBounds | None = None,
    ) -> ClassifyResult: ...
    def prompt_tokens(self, prompt: str, image_tokens: int, system_prompt: str | None = None) -> int: ...
    def load_adapter(self, name: str, path: str | Path) -> None: ...
    def set_lora_slots(self, slots: int, max_rank: int) -> None: ...
    def unload_adapter(self, name: str) -> None: ...


#: (engine settings, model folder or None for the base model, engine name) -> engine
EngineFactory = Callable[[EngineSettings, Path | None, str], DeploymentEngine]


def load_engine(settings: EngineSettings, path: Path | None, name: str) -> DeploymentEngine:
    return Engine.load(settings, path, name=name)


S = TypeVar("S", bound="ModelSettings")


class ModelDeployment(ABC, Generic[S]):
    """What the dynamic and merged deployments share: typed settings, an injectable engine factory and
    store, and the batch size and wait of their ``@serve.batch`` method ``_batched``. Subclasses set
    themselves up in :meth:`_start`."""

    _batched: Any  # the subclass's @serve.batch method

    def __init__(
        self, settings: S, *, engine_factory: EngineFactory = load_engine, storage: AdapterStore | None = None
    ) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.storage: AdapterStore = storage or Storage(settings.storage.url, settings.storage.cache_dir)
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batching.batch_wait_timeout_s)
        self._start()

    @abstractmethod
    def _start(self) -> None:
        """Set up the deployment's own state (engine, caches) once settings and store are in place."""

    def check_prompt(self, engine: DeploymentEngine, query: Query) -> None:
        """Refuse a prompt over ``max_prompt_tokens`` (its image's tokens included) with a 4xx."""
        limit = self.settings.engine.max_prompt_tokens
        try:
            n = engine.prompt_tokens(query.prompt, query.image_tokens)
        except UnicodeEncodeError as e:
            raise BadInput("prompt", f"prompt is not valid unicode ({e.reason} at position {e.start})") from e
        if n > limit:
            raise BadInput(
                "prompt",
                f"the prompt is {n} tokens with its image ({query.image_tokens} image tokens), over the limit "
                f"of {limit}; shorten the prompt or send a lower max_pixels",
                413,
            )
