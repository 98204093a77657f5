"""The embedded demo: deterministic builds, no-op rebuilds, configured types only, accuracy floors;
the reading expert (ocr): its screens, its attention targets, its metric and its training."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_core.config import DeploymentConfig
from moe_core.probes import read_probe_folder
from moe_core.storage.store import Storage
from moe_demo.build import ACCEPT, SEED_STRIDE, build_demo, evaluate_demo, plan
from moe_demo.screens import GRID, OCR_ALPHABETS, OCR_LAYOUT, SCREEN_TYPES, make_screen, split
from moe_demo.train import (
    END,
    FeatureBank,
    TrainSpec,
    _attention_loss,
    char_accuracy,
    evaluate_router,
    train_adapter,
)


def _small_cfg(root: Path) -> DeploymentConfig:
    return DeploymentConfig.from_dict(
        {
            "storage": {"url": str(root / "storage")},
            "router": {"adapter": "router", "labels": {0: "calendar", 1: "login-window"}},
            "merged": {"adapters": [{"name": "calendar"}]},
            "dynamic": {"adapters": ["login-window"]},
            "limits": {"min_pixels": 128 * 128, "max_pixels": 128 * 128},
        }
    )


def test_screens_are_deterministic_and_split() -> None:
    a, b = make_screen("calendar", 3), make_screen("calendar", 3)
    assert a.image.tobytes() == b.image.tobytes() and a.cell == b.cell
    assert a.answer == f"click({a.cell[0]}, {a.cell[1]})" and 0 <= max(a.cell) < GRID
    train, val, held = ({(s.kind, s.seed) for s in split(n, 20)} for n in ("train", "validation", "heldout"))
    assert (
        not train & held and not train & val and not val & held and {k for k, _ in train} == set(SCREEN_TYPES)
    )
    with pytest.raises(ValueError, match="unknown screen type"):
        make_screen("spreadsheet", 0)
    with pytest.raises(ValueError, match="unknown split"):
        split("test", 1)


def test_ocr_screens_are_deterministic_and_hold_one_character_per_image_token(tiny_path: Path) -> None:
    from transformers import AutoTokenizer

    from moe_core.vision import PixelBounds
    from moe_core.vision import plan as image_plan

    a, b = make_screen("ocr", 3), make_screen("ocr", 3)
    assert a.image.tobytes() == b.image.tobytes() and (a.text, a.glyphs) == (b.text, b.glyphs)
    assert a.answer == a.text and a.prompt == "Read the highlighted field"
    assert make_screen("ocr", 4).image.tobytes() != a.image.tobytes()
    clean = make_screen("ocr", 3, clutter=False)  # the warm-up twin: same text, the other field empty
    assert (clean.text, clean.glyphs) == (a.text, a.glyphs) and clean.image.tobytes() != a.image.tobytes()
    tok = AutoTokenizer.from_pretrained(tiny_path)
    cols, rows = OCR_LAYOUT
    demo = PixelBounds(128 * 128, 128 * 128)  # the shipped config's bounds
    screens = split("train", 60, ("ocr",)) + split("heldout", 20, ("ocr",))
    for s in screens:
        assert 2 <= len(s.text) <= 6 and set(s.text) <= set(OCR_ALPHABETS[1]), s.text
        assert len(tok.tokenize(s.text)) == len(s.text), s.text  # one token per character
        seen = image_plan(s.image.width, s.image.height, demo, 32)
        assert (seen.model_width, seen.model_height, seen.tokens) == (32 * cols, 32 * rows, cols * rows)
        cells = [(int(x * cols), int(y * rows)) for x, y in s.glyphs]  # the image token of each character
        assert [c for c, _ in cells] == list(range(1, len(s.text) + 1)) and len({r for _, r in cells}) == 1
        assert min(s.cell) >= 0 and max(s.cell) < GRID
    assert {len(s.text) for s in screens} == set(range(2, 7))
    assert any(s.text.isdigit() for s in screens) and any(not s.text.isdigit() for s in screens)
    assert {int(s.glyphs[0][1] * rows) for s in screens} == set(range(rows))  # either field is the one read
    assert len({s.image.size for s in screens}) > 10


def test_char_accuracy_is_one_minus_the_character_error_rate() -> None:
    assert char_accuracy(["A3F9", "12"], ["A3F9", "12"]) == 1.0
    assert char_accuracy(["A3E9", "1"], ["A3F9", "12"]) == pytest.approx(1 - 2 / 6)  # substitution, deletion
    assert char_accuracy(["A3F9X"], ["A3F9"]) == pytest.approx(0.75)  # an insertion
    assert char_accuracy(["click(1, 2)"], ["42"]) == 0.0  # never below 0


def test_feature_bank_points_each_character_at_its_image_token(tmp_path: Path) -> None:
    """The attention loss's targets: the step that predicts character i looks at the token of glyph i."""
    cfg = _small_cfg(tmp_path)
    screens = split("train", 3, ("ocr",))
    examples = [(s, s.prompt, s.answer) for s in screens]
    examples.append((screens[0], "Which screen is this?", "ocr"))  # a routing example: no targets
    bank = FeatureBank(cfg, examples, system_prompt=cfg.system_prompt)
    tok = bank.processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    cols, rows = OCR_LAYOUT
    for s, row in zip(screens, bank.rows, strict=False):
        first = int((row.input_ids == image_id).nonzero()[0])
        assert len(row.looks) == len(s.text) and int((row.input_ids == image_id).sum()) == cols * rows
        for i, (q, k) in enumerate(row.looks):
            assert tok.decode(row.input_ids[q + 1]) == s.text[i]  # position q predicts character i
            assert ((k - first) % cols, (k - first) // cols) == (i + 1, int(s.glyphs[i][1] * rows))
    assert bank.rows[-1].looks == ()


def test_reading_expert_training_is_deterministic_and_learns_where_to_look(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from moe_core.modeling import load_model

    cfg = _small_cfg(tmp_path)
    screens = split("train", 16, ("ocr",))
    bank = FeatureBank(cfg, [(s, s.prompt, s.answer) for s in screens], system_prompt=cfg.system_prompt)
    spec = TrainSpec("ocr", steps=25, batch_size=8, lr=4e-3, seed=3, head_lr=10.0, attend=1.0)
    a = train_adapter(cfg, spec, bank, tmp_path / "a")
    b = train_adapter(cfg, spec, bank, tmp_path / "b")
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    eager = cfg.base_model.model_copy(update={"attn_implementation": "eager"})

    def attention_loss(model: torch.nn.Module) -> float:
        with torch.no_grad():
            out = model(**bank.batch(bank.rows), output_attentions=True)
        return float(_attention_loss(out.attentions[-1], bank.rows))

    before = attention_loss(load_model(eager))
    after = attention_loss(PeftModel.from_pretrained(load_model(eager), str(a)))
    assert after < before / 2, (before, after)


def test_feature_bank_gives_the_pixel_path_loss(tmp_path: Path) -> None:
    """Training on cached token ids and vision features is the same computation as on pixels."""
    import torch

    from moe_core.engine import Engine
    from moe_core.modeling import load_model, load_processor

    cfg = _small_cfg(tmp_path)
    examples = [(s, s.prompt, s.answer) for s in split("train", 2, ("calendar", "desktop"))]
    examples.append((examples[0][0], "A longer prompt, so the rows need padding", "click(0, 0)"))
    bank = FeatureBank(cfg, examples, system_prompt=cfg.system_prompt, clean=True)
    assert len(bank) == len(bank.clean_rows) == len(examples)
    cached = bank.batch(bank.rows)
    engine = Engine(load_model(cfg.base_model), load_processor(cfg.base_model), cfg.engine_settings)
    pixels = engine.encode(
        [s.image for s, _, _ in examples],
        [p for _, p, _ in examples],
        answers=[a + END for _, _, a in examples],
        padding_side="right",
    )
    assert torch.equal(cached["input_ids"], pixels["input_ids"])
    assert torch.equal(cached["attention_mask"], pixels["attention_mask"])
    answer = cached["labels"] != -100
    assert answer.sum(-1).tolist() == [
        len(engine.processor.tokenizer.encode(a + END)) for _, _, a in examples
    ]
    with torch.no_grad():
        a = engine.model(**cached)
        b = engine.model(**pixels, labels=cached["labels"])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    clean = bank.batch(bank.clean_rows)  # the uncluttered twins: same tokens, other pixels
    assert torch.equal(clean["input_ids"], cached["input_ids"])
    assert not torch.equal(clean["mm_encoder_outputs"]["image"].pooler_output[0], bank.rows[0].image)


def test_build_is_bit_for_bit_deterministic_and_rebuild_is_a_noop(tmp_path: Path) -> None:
    shas = []
    for run in ("one", "two"):
        cfg = _small_cfg(tmp_path / run)
        report = build_demo(
            cfg, tmp_path / run / "work", steps_scale=0.02, heldout_per_kind=2, attempts=2, say=lambda s: None
        )
        assert {r["status"] for r in report.rows} == {"built"}
        st = Storage(cfg.storage.url)
        shas.append(
            {
                n: st.read_json(k, n, "deploy_metadata.json")["adapter_sha256"]  # type: ignore[arg-type]
                for k, n in (("router", "router"), ("expert", "calendar"), ("expert", "login-window"))
            }
        )
    assert shas[0] == shas[1]
    meta = Storage(_small_cfg(tmp_path / "one").storage.url).read_json(
        "expert", "calendar", "deploy_metadata.json"
    )
    # 9 steps cannot reach the 90% validation target, so both seeds were tried and the better one kept
    assert meta["attempts"] == 2 and meta["train_seed"] in (7, 7 + SEED_STRIDE)
    assert 0.0 <= meta["validation_accuracy"] < ACCEPT["expert"]
    assert not list((tmp_path / "one" / "work").glob("*.attempt*"))  # losing attempts are cleaned up
    st = Storage(_small_cfg(tmp_path / "one").storage.url)
    probes = {n: st.current_version("probes", n) for n in st.names("probes")}
    again = build_demo(
        _small_cfg(tmp_path / "one"),
        tmp_path / "one" / "work",
        steps_scale=0.02,
        heldout_per_kind=2,
        attempts=2,
        say=lambda s: None,
    )
    assert {r["status"] for r in again.rows} == {"unchanged"}
    assert {n: st.current_version("probes", n) for n in st.names("probes")} == probes  # not republished
    assert again.seconds < 10


def test_screen_types_missing_from_config_are_not_trained(tmp_path: Path) -> None:
    cfg = _small_cfg(tmp_path)
    assert plan(cfg).kinds == ("calendar", "login-window")
    build_demo(cfg, tmp_path / "work", steps_scale=0.01, heldout_per_kind=1, attempts=1, say=lambda s: None)
    st = Storage(cfg.storage.url)
    assert st.names("expert") == ["calendar", "login-window"]
    assert st.names("router") == ["router"]
    assert st.names("probes") == ["calendar", "default", "login-window"]  # the merge probe sets
    probes = read_probe_folder(st.fetch("probes", "calendar")[0])
    assert len(probes) == cfg.merge.num_probes and {p for _, p in probes} == {"Click the highlighted day"}
    assert not list((tmp_path / "work").glob("desktop*"))


ROUTER_FLOOR = 0.9
EXPERT_FLOOR = 0.8  # held-out exact match on a 4x4 grid; chance is 1/16 (the build's target is 0.9)
CHAR_FLOOR = 0.9  # the reading expert's held-out character accuracy (measured 0.976; exact match 0.92)


@pytest.mark.slow
def test_trained_adapters_meet_accuracy_floors(demo_cfg: DeploymentConfig) -> None:
    st = Storage(demo_cfg.storage.url)
    meta = st.read_json("router", "router", "deploy_metadata.json")
    assert meta["eval_accuracy"] >= ROUTER_FLOOR and meta["dataset_name"] == "synthetic-screens-v1"
    assert "ocr" in demo_cfg.router.labels.values() and "ocr" in demo_cfg.dynamic.adapters
    rows = {r["name"]: r for r in evaluate_demo(demo_cfg, heldout_per_kind=8, offset=900)}
    assert rows["router"]["accuracy"] >= ROUTER_FLOOR and rows["router"]["n"] == 8 * len(SCREEN_TYPES)
    for kind in SCREEN_TYPES:  # the six click experts and the reader (exact match)
        meta = st.read_json("expert", kind, "deploy_metadata.json")
        assert meta["eval_accuracy"] >= EXPERT_FLOOR, (kind, meta["eval_accuracy"])
        assert meta["validation_accuracy"] >= ACCEPT["expert"], (kind, meta["validation_accuracy"])
        assert rows[kind]["accuracy"] >= 0.75, (kind, rows[kind])  # 8 more held-out screens, re-measured
        assert rows[kind]["accuracy"] > rows[kind]["base_accuracy"], kind  # the expert, not the base, knows
    meta = st.read_json("expert", "ocr", "deploy_metadata.json")
    assert meta["char_accuracy"] >= CHAR_FLOOR and rows["ocr"]["char_accuracy"] >= CHAR_FLOOR, rows["ocr"]
    assert rows["ocr"]["base_char_accuracy"] < 0.5, rows["ocr"]
    from moe_core.engine import Engine

    engine = Engine.load(demo_cfg.engine_settings, name="test-routing")
    engine.load_adapter("router", st.fetch("router", "router")[0])
    reading = split("heldout", 16, ("ocr",), offset=900)  # routing of the seventh type on its own
    assert (
        evaluate_router(engine, "router", list(plan(demo_cfg).kinds), demo_cfg.router.prompt, reading) >= 0.9
    )
