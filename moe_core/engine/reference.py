"""The Hugging Face reference paths of an :class:`~moe_core.engine.core.Engine`: the model's own forward
on a padded batch (not the paged runner), under the engine's lock and its adapters' context.

They are the reference the paged path is tested against, and training's; the engine's
:meth:`~moe_core.engine.core.Engine.generate_hf`, :meth:`~moe_core.engine.core.Engine.logits` and
:meth:`~moe_core.engine.core.Engine.classify` call them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from moe_core.engine.request import Classification, EngineError, GenerationRequest, GenerationResult
from moe_core.vision import PixelBounds

if TYPE_CHECKING:
    from moe_core.engine.core import Engine

__all__ = ["classify", "generate_hf", "logits"]


@torch.inference_mode()
def generate_hf(
    engine: Engine, requests: Sequence[GenerationRequest], *, exact_tokens: int | None = None
) -> list[GenerationResult]:
    """The whole batch in one Hugging Face ``generate`` call (greedy, a left-padded batch and its
    own cache): the reference the paged path is tested against. Adapters with vision-tower weights
    are refused here (``generate`` runs the tower without the slots)."""
    if not requests:
        return []
    if engine.slots is not None and any(r.adapter in engine.slots.vision for r in requests):
        raise EngineError("adapters with vision-tower weights need generate(), not generate_hf()")
    t0 = time.perf_counter()
    max_new = exact_tokens or max(r.max_new_tokens or engine.max_new_tokens for r in requests)
    fixed = {"min_new_tokens": exact_tokens} if exact_tokens else {}
    with engine.lock, engine.adapter_context([r.adapter for r in requests]) as kwargs:
        inputs = engine._encode_requests(requests)
        # inputs.input_ids: [batch, prompt_len] -> out: [batch, prompt_len + new]
        out = engine.model.generate(**inputs, **kwargs, **fixed, max_new_tokens=max_new, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    dt = time.perf_counter() - t0
    n_adapters = len({r.adapter for r in requests})
    results = []
    prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
    for r, row, n_in in zip(requests, new, prompt_lengths, strict=True):
        row = row[: exact_tokens or r.max_new_tokens or engine.max_new_tokens]
        text = engine.processor.tokenizer.decode(row, skip_special_tokens=True).strip()
        n = int((row != engine.processor.tokenizer.pad_token_id).sum())
        results.append(GenerationResult(text, r.adapter, n, len(requests), n_adapters, dt, int(n_in)))
    return results


@torch.inference_mode()
def logits(engine: Engine, requests: Sequence[GenerationRequest]) -> torch.Tensor:
    """Next-token logits over each request's prompt, in fp32: ``[batch, prompt_len, vocab]``."""
    with engine.lock, engine.adapter_context([r.adapter for r in requests]) as kwargs:
        inputs = engine._encode_requests(requests)
        return engine.model(**inputs, **kwargs).logits.float()


@torch.inference_mode()
def classify(
    engine: Engine,
    image: Image.Image,
    prompt: str,
    labels: Sequence[str],
    adapter: str | None,
    system_prompt: str = "",
    bounds: PixelBounds | None = None,
) -> Classification:
    """Score the label set as the assistant's answer; one forward pass.

    When every label starts with a different token, one batch-1 forward scores them all from the
    next-token distribution; otherwise one batched forward scores each label's full token sequence.
    """
    if not labels:
        raise EngineError("classify needs at least one label")
    tok = engine.processor.tokenizer
    with engine.lock, engine.adapter_context([adapter]) as kwargs:  # the tokenizer is the lock holder's too
        label_ids = [tok.encode(lbl, add_special_tokens=False) for lbl in labels]
        firsts = [ids[0] for ids in label_ids]
        if len(set(firsts)) == len(firsts):
            inputs = engine.encode([image], [prompt], system_prompt, bounds=[bounds])
            logits = engine.model(**inputs, **kwargs).logits[0, -1]  # [vocab]
            scores = torch.log_softmax(logits.float(), -1)[firsts]
        else:
            scores = _score_sequences(engine, image, prompt, labels, label_ids, kwargs, system_prompt, bounds)
    probs = torch.softmax(scores, -1).tolist()
    best = max(range(len(labels)), key=lambda i: probs[i])
    return Classification(labels[best], probs[best], dict(zip(labels, probs, strict=True)))


def _score_sequences(
    engine: Engine,
    image: Image.Image,
    prompt: str,
    labels: Sequence[str],
    label_ids: list[list[int]],
    kwargs: dict[str, Any],
    system_prompt: str,
    bounds: PixelBounds | None,
) -> torch.Tensor:
    n = len(labels)
    inputs = engine.encode(
        [image] * n,
        [prompt] * n,
        system_prompt,
        answers=labels,
        padding_side="right",
        bounds=[bounds] * n,
    )
    if "adapter_names" in kwargs:
        kwargs = {"adapter_names": kwargs["adapter_names"] * n}
    logp = torch.log_softmax(engine.model(**inputs, **kwargs).logits.float(), -1)  # [n, len, vocab]
    lengths = inputs["attention_mask"].sum(-1)
    out = []
    for i, ids in enumerate(label_ids):
        end = int(lengths[i])
        pos = range(end - len(ids) - 1, end - 1)
        out.append(sum(float(logp[i, p, t]) for p, t in zip(pos, ids, strict=True)))
    return torch.tensor(out)
