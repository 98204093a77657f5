"""From a step's logits to answers: each row's next token (its grammar's mask and blocked ends applied,
its own sampling settings), its new text, logprobs and finish; and a classification's verdict."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moe_core.engine.request import Classification, Delta, EngineError, Timings
from moe_core.engine.sampling import FinishReason, next_tokens, token_logprobs
from moe_core.engine.sequence import Job, Seq

if TYPE_CHECKING:
    from moe_core.engine.core import Engine

__all__ = ["advance", "score"]


def advance(
    engine: Engine,
    eos: set[int],
    rows: list[tuple[Seq, torch.Tensor]],
    drop: Callable[[Seq, BaseException | None], None],
) -> None:
    """Pick each row's next token from its logits (grammar masks and blocked ends applied, logprobs from
    the raw logits), send its new text, and let finished rows leave (``drop``)."""
    seqs = [s for s, _ in rows]
    params = [s.job.params for s in seqs]
    raw = torch.stack([t for _, t in rows])  # [rows, vocab], fp32
    blocked = [p.blocks_eos(s.generated) for s, p in zip(seqs, params, strict=True)]
    # grammar masks and blocked ends on a copy: the raw logits are what logprobs report
    logits = engine.grammars.mask(raw, [s.matcher for s in seqs], blocked)
    history = [(s.tokens, len(s.job.prompt)) for s in seqs]
    tokens = next_tokens(logits, params, [s.generator for s in seqs], history=history)
    asked = [p.logprobs for p in params]
    logprobs = token_logprobs(raw, tokens, asked, engine.token_text)
    now = time.perf_counter()
    for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
        job = seq.job
        assert seq.text is not None
        seq.generated += 1
        seq.tokens.append(token)
        if seq.matcher is not None and not seq.matcher.accept(token):
            drop(seq, EngineError(f"token {token} breaks the row's grammar"))
            continue
        if lp is not None and token not in eos:
            seq.logprobs.append(lp)
        if seq.generated == 1:
            job.first = now
        limit = job.params.max_tokens or engine.max_new_tokens
        finish: FinishReason | None = "stop" if token in eos else None
        text = ""
        if finish is None:
            text = seq.text.add(token)
            if seq.text.stopped or (seq.matcher is not None and seq.matcher.done):
                finish = "stop"
        if finish is None and seq.generated >= limit:
            finish = "length"
        timings = None
        if finish is not None:
            text += seq.text.flush()
            tpot = (now - job.first) / (seq.generated - 1) if seq.generated > 1 else 0.0
            timings = Timings(job.started - job.arrived, job.first - job.arrived, now - job.arrived, tpot)
            drop(seq, None)
        if text or finish is not None:
            job.sink(
                Delta(
                    text,
                    finish,
                    len(job.prompt),
                    seq.generated,
                    seq.most_rows,
                    seq.most_adapters,
                    timings,
                    seq.cached_tokens,
                    tuple(seq.logprobs),
                )
            )
            seq.logprobs.clear()


def score(engine: Engine, job: Job, logits: torch.Tensor) -> Classification | BaseException:
    """A classification's verdict from its prompt's next-token ``logits`` (each label's first token), or
    from whole label sequences (Hugging Face's forward) when labels share a first token."""
    tok = engine.processor.tokenizer
    firsts = [tok.encode(label, add_special_tokens=False)[0] for label in job.labels]
    if len(set(firsts)) < len(firsts):  # labels share a first token: score whole label sequences
        r = job.request
        try:
            image = r.images[-1] if r.images else None
            if image is None:
                raise EngineError("classifying by label sequences needs an image")
            return engine.classify(image, r.prompt, job.labels, r.adapter, system_prompt="", bounds=r.bounds)
        except Exception as e:
            return e
    scores = torch.log_softmax(logits, -1)[firsts]
    probs = torch.softmax(scores, -1).tolist()
    best = max(range(len(job.labels)), key=lambda i: probs[i])
    return Classification(job.labels[best], probs[best], dict(zip(job.labels, probs, strict=True)))
