"""The streamed text of a row: detokenized incrementally, it is the whole answer decoded at once."""

from __future__ import annotations

import random

import torch

from moe_core.config import DeploymentConfig
from moe_core.engine.sampling import SamplingParams, TextStream, _filtered_probs, make_generator, next_tokens
from moe_core.modeling import load_processor


def test_incremental_detokenization_gives_the_whole_decode() -> None:
    tok = load_processor(DeploymentConfig().base_model).tokenizer
    rng = random.Random(0)
    decoded = 0
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 80))]
        stream = TextStream(tok)
        out = "".join(stream.add(t) for t in ids) + stream.flush()
        whole = tok.decode(ids, skip_special_tokens=True).strip()
        # a last character cut inside its UTF-8 bytes is withheld, as it always was
        assert out in (whole, whole.rstrip("\ufffd").rstrip())
        decoded += len(out)
    assert decoded > 1000


def test_each_token_decodes_a_window_not_the_whole_answer() -> None:
    tok = load_processor(DeploymentConfig().base_model).tokenizer
    lengths: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kw: object) -> str:
            lengths.append(len(ids))
            return str(tok.decode(ids, **kw))

    stream = TextStream(Counting())
    for t in tok("a fairly long answer " * 40, add_special_tokens=False)["input_ids"]:
        stream.add(t)
    assert max(lengths) <= 8 and stream.text.startswith("a fairly long answer")


def _one_row(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's probabilities, filtered on their own (the per-row reference)."""
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.numel():
        kth = scaled.topk(p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return probs


def test_sampled_rows_are_filtered_together_as_each_would_be_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.5, top_k=40, top_p=0.5),
        SamplingParams(temperature=1.0, top_p=0.1),
        SamplingParams(temperature=2.0, top_k=1),
    ]
    together = _filtered_probs(logits, params)
    for row, p in enumerate(params):
        assert torch.allclose(together[row], _one_row(logits[row], p), atol=1e-7)
    assert int((together[5] > 0).sum()) == 1 and int((together[2] > 0).sum()) == 5
    # a seeded row draws the same tokens alone as beside other sampled and greedy rows
    alone = next_tokens(
        logits[3:4], [params[3]], [make_generator(SamplingParams(temperature=0.5, seed=7), logits.device)]
    )
    mixed_params = [SamplingParams(), params[1], params[3]]
    gens = [
        None,
        make_generator(params[1], logits.device),
        make_generator(SamplingParams(temperature=0.5, seed=7), logits.device),
    ]
    mixed = next_tokens(torch.stack([logits[0], logits[1], logits[3]]), mixed_params, gens)
    assert mixed[2] == alone[0] and mixed[0] == int(logits[0].argmax())
