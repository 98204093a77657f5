"""The paged engine on the real tiny model: what the KV memory manager promises, row by row.

Pages are shared and reused, rows join and leave without touching each other's pages, memory bounds
admission instead of failing requests, a failing row fails alone, an agent's next turn reuses its
history, and a new version of an adapter never sees the old version's cached state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moe_core.config import DeploymentConfig, EngineSettings
from moe_core.engine import Completion, Engine, EngineError, GenerationRequest, Scheduler, Turn, run_batch
from moe_core.generation import SamplingParams
from tests.helpers import make_lora, screenshot

#: the demo's pixel bounds (16 image tokens an image), so prompts stay short
SETTINGS: EngineSettings = DeploymentConfig(limits={"min_pixels": 16384, "max_pixels": 65536}).engine_settings


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paged")
    return {
        "alpha": make_lora(root / "alpha", seed=41, rank=4),
        "beta": make_lora(root / "beta", seed=42, rank=8, lm_head=True),
        "eye": make_lora(root / "eye", seed=43, rank=4, vision=True),
        "eye2": make_lora(root / "eye2", seed=44, rank=4, vision=True),
    }


def _engine(adapters: dict[str, Path], name: str, **kw: Any) -> Engine:
    e = Engine.load(SETTINGS.model_copy(update=kw.pop("settings", {})), name=name, **kw)
    e.set_lora_slots(4, 8)
    for a in ("alpha", "beta", "eye"):
        e.load_adapter(a, adapters[a])
    return e


@pytest.fixture(scope="module")
def engine(adapters: dict[str, Path]) -> Engine:
    return _engine(adapters, "paged")


def _req(i: int, adapter: str | None, size: tuple[int, int] = (200, 160), **kw: Any) -> GenerationRequest:
    return GenerationRequest(screenshot(i, size), f"Click button {i}", adapter, **kw)


class Collect:
    """A sink that keeps what one request got."""

    def __init__(self) -> None:
        self.text = ""
        self.error: BaseException | None = None
        self.done: Any = None

    def __call__(self, item: Any) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.text += item.text
            if item.finish_reason is not None:
                self.done = item


def _fresh(engine: Engine) -> None:
    engine.pages.clear_cache()
    engine.features.clear()


def test_paged_rows_equal_hugging_face_generate_per_row_for_mixed_batches_with_images(engine: Engine) -> None:
    _fresh(engine)
    adapters = ["alpha", None, "beta", "alpha", None, "beta"]
    reqs = [_req(i, a, (160 + 32 * i, 128 + 16 * (i % 3)), max_new_tokens=10) for i, a in enumerate(adapters)]
    paged = [r.text for r in engine.generate(reqs)]
    # (an answer cut inside a UTF-8 character ends before it here; Hugging Face's decode shows U+FFFD)
    assert paged == [r.text.rstrip("\ufffd") for r in engine.generate_hf(reqs)]
    assert paged == [engine.generate([r])[0].text for r in reqs]  # and as each row alone


def test_a_row_joining_and_leaving_leaves_the_other_rows_pages_alone(engine: Engine) -> None:
    _fresh(engine)
    sched = Scheduler(engine, max_running=4, name="join")
    long, short = Collect(), Collect()
    sched.enqueue(_req(1, "alpha"), SamplingParams(max_tokens=40, min_tokens=40), long, request_id="long")
    for _ in range(5):
        sched.iterate()
    (seq,) = sched._running
    pages, length = list(seq.pages), seq.computed
    p = engine.kv.layout.page_tokens
    k, v = engine.kv.flat(0)
    slots = torch.tensor([pages[t // p] * p + t % p for t in range(length)])
    keys, values = k[slots].clone(), v[slots].clone()
    written = engine.kv.bytes_written
    sched.enqueue(_req(2, "beta"), SamplingParams(max_tokens=3), short, request_id="short")
    sched.iterate()  # the short row joins: its prompt, and one token of the long row
    (joined,) = [s for s in sched._running if s.request_id == "short"]
    per_token = engine.kv.layout.bytes_per_token
    assert engine.kv.bytes_written - written == (joined.computed + 1) * per_token  # nothing else moved
    while short.done is None:
        sched.iterate()  # ... and leaves
    assert seq.pages[: len(pages)] == pages  # the long row's block table never moved
    k, v = engine.kv.flat(0)
    assert torch.equal(k[slots], keys) and torch.equal(v[slots], values)  # nor its keys and values
    while long.done is None:
        sched.iterate()
    assert long.done.completion_tokens == 40 and short.done.completion_tokens == 3


def test_admission_waits_for_pages_instead_of_failing(adapters: dict[str, Path]) -> None:
    """A pool that holds two rows at a time, six requests: all answer, as alone, in arrival order."""
    probe = _engine(adapters, "probe")
    reqs = [_req(i, ["alpha", None, "beta"][i % 3], max_new_tokens=12) for i in range(6)]
    solo = [probe.generate([r])[0].text for r in reqs]
    longest = max(len(probe.prompts.build(r)) for r in reqs) + 12
    p = probe.kv.layout.page_tokens
    pages = 2 * -(-longest // p) + 1
    small = _engine(
        adapters,
        "small",
        settings={"kv": SETTINGS.kv.model_copy(update={"prefix_caching": False})},
        kv_cache_bytes=(pages + 2) * probe.kv.layout.bytes_per_page,
    )
    assert small.kv.pages == pages
    sched = Scheduler(small, max_running=6, name="small")
    sinks = [Collect() for _ in reqs]
    for i, (r, sink) in enumerate(zip(reqs, sinks, strict=True)):
        sched.enqueue(r, SamplingParams(max_tokens=12, min_tokens=12), sink, request_id=f"r{i}")
    finished: list[int] = []
    started: list[str] = []
    most = 0
    while sched.iterate():
        most = max(most, sched.running)
        for rec in sched.history:
            started += [rid for rid, _ in rec.prefill if rid not in started]
        finished += [i for i, s in enumerate(sinks) if s.done is not None and i not in finished]
    assert [s.error for s in sinks] == [None] * 6
    assert [s.text for s in sinks] == solo
    assert started == [f"r{i}" for i in range(6)] and finished == list(range(6))
    assert most <= 3 and small.pages.used == 0  # memory bounded the batch; every page came back
    print(f"most rows at once {most}, preemptions {sched.preemptions}, steps {sched.steps}")


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_running_out_of_pages_mid_decode_preempts_the_youngest_and_it_resumes(
    adapters: dict[str, Path], prefix_caching: bool
) -> None:
    """Prompts fit, their answers do not: the youngest rows give their pages back and are read again
    later (from their own cached pages when prefix caching is on); every answer is still its solo one."""
    probe = _engine(adapters, "probe2")
    reqs = [_req(20 + i, ["alpha", None, "beta", "eye"][i % 4]) for i in range(4)]
    params = SamplingParams(max_tokens=48, min_tokens=48)
    solo = [run_batch(probe, [r], [params])[0].text for r in reqs]
    p = probe.kv.layout.page_tokens
    prompt_pages = max(-(-len(probe.prompts.build(r)) // p) for r in reqs)
    pages = 4 * prompt_pages  # every prompt fits, no answer of 48 tokens does beside the others
    small = _engine(
        adapters,
        "tight",
        settings={"kv": SETTINGS.kv.model_copy(update={"prefix_caching": prefix_caching})},
        kv_cache_bytes=(pages + 2) * probe.kv.layout.bytes_per_page,
    )
    sched = Scheduler(small, max_running=4, name="tight")
    sinks = [Collect() for _ in reqs]
    for i, (r, sink) in enumerate(zip(reqs, sinks, strict=True)):
        sched.enqueue(r, params, sink, request_id=f"r{i}")
    while sched.iterate():
        pass
    assert [s.error for s in sinks] == [None] * 4
    assert sched.preemptions > 0 and [s.text for s in sinks] == solo
    assert [s.done.completion_tokens for s in sinks] == [48] * 4 and small.pages.used == 0


def test_a_simulated_out_of_memory_fails_only_the_row_that_caused_it(engine: Engine) -> None:
    _fresh(engine)
    reqs = [_req(i, a, max_new_tokens=8) for i, a in enumerate(["alpha", None, "beta", "eye"])]
    solo = [engine.generate([r])[0].text for r in reqs]
    sched = Scheduler(engine, name="oom")
    sinks = [Collect() for _ in reqs]
    for i, (r, sink) in enumerate(zip(reqs, sinks, strict=True)):
        sched.enqueue(r, SamplingParams(max_tokens=8), sink, request_id=f"r{i}")

    def oom(rows: Any) -> None:  # row 2's prompt is too much for the device, once it is decoding
        if any(w.adapter == "beta" and w.decode for w in rows):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    engine.runner.fail_hook = oom
    try:
        while sched.iterate():
            pass
    finally:
        engine.runner.fail_hook = None
    assert isinstance(sinks[2].error, EngineError) and "out of memory" in str(sinks[2].error)
    assert [s.text for k, s in enumerate(sinks) if k != 2] == [t for k, t in enumerate(solo) if k != 2]
    assert engine.pages.used == 0


def test_non_finite_state_fails_its_row_alone_and_is_never_shared(engine: Engine) -> None:
    """NaN written into one row's pages: that row fails, the other answers as alone, and a later
    request with the same prompt neither hits the poisoned pages nor reads the NaN left in a reused page."""
    _fresh(engine)
    bad_req, good_req = _req(5, "alpha", max_new_tokens=8), _req(6, "beta", max_new_tokens=8)
    good_solo = engine.generate([good_req])[0].text
    bad_solo = engine.generate([bad_req])[0].text
    sched = Scheduler(engine, name="nan")
    bad, good = Collect(), Collect()
    sched.enqueue(bad_req, SamplingParams(max_tokens=8), bad, request_id="bad")
    sched.enqueue(good_req, SamplingParams(max_tokens=8), good, request_id="good")
    sched.iterate()
    (seq,) = [s for s in sched._running if s.request_id == "bad"]
    for layer in range(engine.kv.layout.layers):  # every layer's keys of every page of that row
        for page in seq.pages:
            engine.kv.page(layer, page)[0].fill_(float("nan"))
    while sched.iterate():
        pass
    assert isinstance(bad.error, EngineError) and "non-finite" in str(bad.error)
    assert good.text == good_solo
    again = engine.generate([bad_req])[0].text
    assert again == bad_solo  # recomputed: the poisoned pages were forgotten, stale NaN never read


def _turns(image1: Any, answer: str | None, image2: Any | None) -> tuple[Turn[Any], ...]:
    turns = [Turn("user", (image1, "Open the calendar"))]
    if answer is not None:
        turns += [Turn("assistant", (answer,)), Turn("user", (image2, "Now pick the 3rd"))]
    return tuple(turns)


def test_an_agents_next_turn_reuses_its_history_and_answers_as_a_cold_run(engine: Engine) -> None:
    _fresh(engine)
    one, two = screenshot(11, (256, 192)), screenshot(12, (256, 192))
    (first,) = run_batch(
        engine,
        [GenerationRequest(None, "", "alpha", turns=_turns(one, None, None))],
        [SamplingParams(max_tokens=8)],
    )
    turn2 = GenerationRequest(None, "", "alpha", turns=_turns(one, first.text, two))
    hits, images = engine.pages.hits, engine.vision_images
    (warm,) = run_batch(engine, [turn2], [SamplingParams(max_tokens=8)])
    p = engine.kv.layout.page_tokens
    assert warm.cached_tokens >= (first.prompt_tokens // p) * p > 0  # turn 1's prompt pages, shared
    assert engine.pages.hits - hits == warm.cached_tokens // p
    assert engine.vision_images - images == 1  # only the new screenshot ran through the vision tower
    _fresh(engine)
    (cold,) = run_batch(engine, [turn2], [SamplingParams(max_tokens=8)])
    assert cold.cached_tokens == 0 and cold.text == warm.text


def test_a_reloaded_adapter_gets_nothing_cached_by_its_old_version(
    engine: Engine, adapters: dict[str, Path]
) -> None:
    """vLLM #30931 / #44939: the same name, new weights: no page and no vision feature of the old version."""
    _fresh(engine)
    req = _req(7, "eye", max_new_tokens=8)
    params = [SamplingParams(max_tokens=8)]
    (old,) = run_batch(engine, [req], params)
    (again,) = run_batch(engine, [req], params)
    assert again.cached_tokens > 0  # the same version hits
    images = engine.vision_images
    engine.load_adapter("eye", adapters["eye2"])  # a new version under the same name
    try:
        (new,) = run_batch(engine, [req], params)
        assert new.cached_tokens == 0 and engine.vision_images == images + 1
        fresh = Engine.load(SETTINGS, name="fresh")
        fresh.set_lora_slots(1, 8)
        fresh.load_adapter("eye", adapters["eye2"])
        assert new.text == fresh.generate([req])[0].text != old.text
    finally:
        engine.load_adapter("eye", adapters["eye"])


def test_chunked_prefill_gives_a_running_stream_a_token_between_chunks(adapters: dict[str, Path]) -> None:
    chunky = _engine(
        adapters,
        "chunky",
        settings={"kv": SETTINGS.kv.model_copy(update={"max_prefill_tokens_per_step": 24})},
    )
    sched = Scheduler(chunky, name="chunks")
    stream, long = Collect(), Collect()
    sched.enqueue(_req(8, "alpha"), SamplingParams(max_tokens=64, min_tokens=64), stream, request_id="stream")
    while not any(s.prefilled for s in sched._running):
        sched.iterate()
    big = GenerationRequest(screenshot(9, (256, 256)), "Read every label on this screen " * 8, "beta")
    sched.enqueue(big, SamplingParams(max_tokens=4), long, request_id="long")
    while long.done is None:
        sched.iterate()
    chunks = [rec for rec in sched.history if any(rid == "long" for rid, _ in rec.prefill)]
    assert len(chunks) >= 3 and all(n <= 24 for rec in chunks for rid, n in rec.prefill if rid == "long")
    assert all("stream" in rec.decode for rec in chunks)  # a token for the stream in every chunk's step
    assert sum(n for rec in chunks for rid, n in rec.prefill if rid == "long") == long.done.prompt_tokens
    while sched.iterate():
        pass
    assert stream.done.completion_tokens == 64 and isinstance(long.done, Completion | object)
