"""A request inside the engine: its job (what was asked, where its answers go) and, once admitted, its
sequence: the tokens so far, its pages (block table), how many tokens have keys and values in them, and
which of its full pages are registered for prefix reuse."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe_core.engine.constraints import Grammar, RowMatcher
from moe_core.engine.kv import PageAllocator, chain_hashes
from moe_core.engine.prompts import Prompt
from moe_core.engine.request import Classification, Delta, GenerationRequest
from moe_core.engine.runner import RowWork
from moe_core.engine.sampling import SamplingParams, TextStream, TokenLogprob
from moe_core.engine.vision_cache import Features

__all__ = ["Job", "Seq"]


@dataclass(eq=False)
class Job:
    """A request as the scheduler holds it: what was asked, where its answers go, its timestamps."""

    request: GenerationRequest
    params: SamplingParams
    sink: Callable[[Delta | BaseException | Classification], None]
    prompt: Prompt
    request_id: str = ""
    labels: tuple[str, ...] = ()  # a classification: score these as the answer's first token
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first: float = 0.0
    cancelled: bool = False
    seq: Seq | None = None  # its state once admitted (kept through a preemption)
    grammar: Grammar | None = None  # its answer's grammar, compiled


@dataclass(eq=False)
class Seq:
    """An admitted request: its tokens, its pages and how many of them hold computed KV."""

    job: Job
    tokens: list[int]  # the prompt, then every generated token
    root: bytes  # the hash chain's root: what decides the KV besides the tokens (model, adapter)
    vision: str | None
    text: TextStream | None
    generator: torch.Generator | None
    order: int = 0  # admission order: the youngest is preempted first
    computed: int = 0  # tokens whose keys and values are in ``pages``
    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # hash of each full page, as far as known
    registered: int = 0  # pages registered in the prefix table (or found there)
    prefilled: bool = False  # read the whole prompt (decoding now)
    generated: int = 0
    cached_tokens: int = 0
    most_rows: int = 0
    most_adapters: int = 0
    features: dict[str, Features] = field(default_factory=dict)
    matcher: RowMatcher | None = None  # where its answer is in its grammar
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent

    @property
    def adapter(self) -> str | None:
        return self.job.request.adapter

    @property
    def request_id(self) -> str:
        return self.job.request_id

    def hash_upto(self, pages: int, page_tokens: int) -> None:
        """Know the hash of each of its first ``pages`` full pages (chained from its root)."""
        seq = self
        if len(seq.hashes) < pages:
            images = [(im.key, im.start, im.tokens) for im in seq.job.prompt.images]
            previous = seq.hashes[-1] if seq.hashes else seq.root
            seq.hashes += chain_hashes(previous, seq.tokens, images, page_tokens, len(seq.hashes), pages)

    def work(self, n: int, *, decode: bool) -> RowWork:
        """Its share of a step: its next ``n`` tokens (one when decoding), their positions, its pages."""
        seq = self
        start = seq.computed
        prompt = seq.job.prompt
        if decode:  # its last generated token: one position, on all three axes
            return RowWork(
                seq.adapter,
                True,
                seq.tokens[start : start + 1],
                start,
                None,
                seq.pages,
                logits=True,
                vision=seq.vision,
                features=seq.features,
                position=start - len(prompt) + prompt.next_position,
            )
        end = min(start + n, len(prompt))
        parts = [prompt.positions[:, start:end]] if start < end else []
        if start + n > len(prompt):  # generated tokens: one position on all three axes
            first = max(start, len(prompt))
            pos = torch.arange(first, start + n) - len(prompt) + prompt.next_position
            parts.append(pos.expand(3, -1))
        return RowWork(
            seq.adapter,
            decode,
            seq.tokens[start : start + n],
            start,
            parts[0] if len(parts) == 1 else torch.cat(parts, dim=1),
            seq.pages,
            logits=start + n == len(seq.tokens),
            prompt=prompt,
            vision=seq.vision,
            features=seq.features,
        )

    def register(self, pages: PageAllocator, page_tokens: int) -> None:
        """Register its newly full pages in the prefix table."""
        seq = self
        full = seq.computed // page_tokens
        if not pages.prefix_caching or full <= seq.registered:
            return
        seq.hash_upto(full, page_tokens)
        for k in range(seq.registered, full):
            pages.register(seq.pages[k], seq.hashes[k])
        seq.registered = full
