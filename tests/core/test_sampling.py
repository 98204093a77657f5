"""The streamed text of a row: detokenized incrementally, it is the whole answer decoded at once."""

from __future__ import annotations

import random

from moe_core.config import DeploymentConfig
from moe_core.engine.sampling import TextStream
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
