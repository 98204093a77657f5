"""The demo's document pages and chandra's side of them: its prompt, its parser on the pages' answers;
the shipped config's chandra limits and grammar against the pages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moe_core.config import DeploymentConfig
from moe_core.vision import PixelBounds, plan
from moe_demo.document import _check_page_grid
from moe_demo.ocr_model import OCR_LAYOUT_PROMPT, client_view
from moe_demo.pages import BBOX_SCALE, PAGE_GRID, PAGE_PIXELS, TEXT_LENGTHS, make_page, page_split

ROOT = Path(__file__).resolve().parents[2]


def test_the_prompt_is_chandras_ocr_layout_prompt() -> None:
    from chandra.prompts import PROMPT_MAPPING

    assert PROMPT_MAPPING["ocr_layout"] == OCR_LAYOUT_PROMPT


def test_client_view_is_chandras_scale_to_fit_on_demo_pages() -> None:
    from chandra.model.util import scale_to_fit

    for page in page_split("heldout", 8):
        assert client_view(page.image).size == scale_to_fit(page.image).size


@pytest.mark.parametrize("seed", range(6))
def test_chandras_parser_reads_a_pages_answer_back(seed: int) -> None:
    from chandra.output import parse_chunks, parse_markdown

    page = make_page(seed)
    chunks = parse_chunks(page.answer, page.image)
    assert [c["label"] for c in chunks] == [b.label for b in page.blocks]
    side = page.image.width
    for chunk, block in zip(chunks, page.blocks, strict=True):
        assert chunk["bbox"] == [int(v * side / BBOX_SCALE) for v in block.bbox]
    markdown = parse_markdown(page.answer)
    assert all(t in markdown for t in page.text.split("\n"))
    assert markdown.startswith(f"# {page.blocks[0].texts[0]}")


def test_glyphs_sit_on_the_image_token_grid_and_pages_differ() -> None:
    pages = page_split("train", 20)
    assert len({p.answer for p in pages}) == 20
    assert any(b.label == "Table" for p in pages for b in p.blocks)
    for p in pages:
        assert len(p.glyphs) == sum(len(t) for b in p.blocks for t in b.texts)
        for x, y in p.glyphs:  # each glyph's centre is a cell's centre
            assert abs(x * PAGE_GRID % 1 - 0.5) < 1e-6 and abs(y * PAGE_GRID % 1 - 0.5) < 1e-6
        seen = plan(*client_view(p.image).size, PixelBounds(*PAGE_PIXELS), 32)
        assert (seen.model_width, seen.model_height) == (32 * PAGE_GRID, 32 * PAGE_GRID)


def _shipped() -> DeploymentConfig:
    return DeploymentConfig.from_file(ROOT / "config" / "deployment.yaml")


def test_the_shipped_chandra_limits_show_a_page_on_its_token_grid() -> None:
    settings = _shipped().model_engine_settings("chandra")
    assert settings.bounds == PixelBounds(*PAGE_PIXELS)
    assert settings.system_prompt == ""
    _check_page_grid("chandra", settings.bounds, settings.image_factor)  # passes: 10x10 tokens
    with pytest.raises(ValueError, match=r"models\.chandra\.limits: .* on 4x4 image tokens"):
        _check_page_grid("chandra", PixelBounds(16384, 16384), settings.image_factor)


def test_the_shipped_output_grammar_allows_every_pages_answer() -> None:
    grammar = _shipped().outputs["chandra"]
    assert grammar.regex is not None
    for page in page_split("train", 40):
        assert re.fullmatch(grammar.regex, page.answer), page.answer


def test_the_document_model_is_built_published_whole_served_and_not_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few steps on a few pages: published as merged/chandra with its build key, loadable as a full
    model with chandra's engine settings, answering a page; a rebuild with nothing changed is a no-op."""
    from dataclasses import replace

    from merge_jobs import MERGE_METADATA
    from moe_core.engine import Engine
    from moe_core.storage.store import Storage
    from moe_demo import document
    from moe_demo.ocr_model import evaluate_pages

    monkeypatch.setattr(document, "SPEC", replace(document.SPEC, steps=2, batch_size=2))
    monkeypatch.setattr(document, "TRAIN_PAGES", 2)
    monkeypatch.setattr(document, "HELDOUT_PAGES", 1)
    monkeypatch.setattr(document, "VALIDATION_PAGES", 1)
    monkeypatch.setattr(document, "ATTEMPTS", 2)  # two steps read nothing: the second seed is tried too
    said: list[str] = []
    data = _shipped().model_dump(mode="json")
    data["storage"] = {"url": str(tmp_path / "storage")}
    data["models"].append({"name": "hub-model", "model": {"id": "some/checkpoint"}})  # nothing to build
    cfg = DeploymentConfig.from_dict(data)
    rows = document.build_document_models(cfg, tmp_path / "work", say=said.append)
    assert [(r["name"], r["status"], r["n"]) for r in rows] == [("chandra", "built", 1)]
    assert sum("attempt" in line for line in said) == 2 and rows[0]["validation_open"] == 0.0
    store = Storage(cfg.storage.url)
    assert store.names("merged") == ["chandra"]
    path, _ = store.fetch("merged", "chandra")
    meta = store.read_json("merged", "chandra", MERGE_METADATA)
    assert meta["eval"]["n"] == 1 and len(meta["build_key"]) == 64
    engine = Engine.load(cfg.model_engine_settings("chandra"), path, name="chandra-test")
    (answer,) = evaluate_pages(engine, page_split("heldout", 1), batch=1)
    assert isinstance(answer, str)
    # the fine-tune's RoPE base travels in its config, and the served model rotates with it
    saved = json.loads((path / "config.json").read_text())["text_config"]["rope_parameters"]
    assert saved["rope_theta"] == document.SPEC.rope_theta == 100.0
    inv_freq = engine.model.model.language_model.rotary_emb.inv_freq
    assert float(inv_freq[1]) == pytest.approx(100.0 ** (-2 / 24))
    again = document.build_document_models(cfg, tmp_path / "work", say=lambda s: None)
    assert [r["status"] for r in again] == ["unchanged"]
    assert len(store.versions("merged", "chandra")) == 1  # not published again


def test_every_text_has_its_block_types_length_and_the_grammar_holds_them_to_it() -> None:
    """Fixed lengths put every block's text at the same place of the answer on every page: what lets
    the model find a column by relative position (moe_demo.pages says why)."""
    grammar = _shipped().outputs["chandra"].regex
    assert grammar is not None
    pages = page_split("train", 20)
    assert {len(p.blocks) for p in pages} >= {3, 4}
    for p in pages:
        for b in p.blocks:
            assert [len(t) for t in b.texts] == [TEXT_LENGTHS[b.label]] * len(b.texts), b
    title = pages[0].blocks[0].texts[0]
    assert not re.fullmatch(grammar, pages[0].answer.replace(f">{title}<", f">{title[:-1]}<", 1))
    assert not re.fullmatch(grammar, pages[0].answer.replace(f">{title}<", f">{title}A<", 1))


def test_training_trains_the_last_layers_query_and_key_norms_and_the_merged_model_keeps_them(
    tmp_path: Path, tiny_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from moe_core.engine import Engine
    from moe_core.modeling import load_model, load_processor
    from moe_demo.ocr_model import OcrSpec, PrefixBank, save_merged, set_rope_theta, train_ocr

    cfg = _shipped()
    settings = cfg.model_engine_settings("chandra")
    model = load_model(cfg.base_model, dtype=torch.float32, device=torch.device("cpu"))
    processor = load_processor(cfg.base_model)
    engine = Engine(model, processor, settings, kv_cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="call set_rope_theta before encoding"):  # the base's 5,000,000
        train_ocr(model, PrefixBank(model, engine, []), OcrSpec(steps=1))
    set_rope_theta(model, OcrSpec().rope_theta)
    pages = page_split("train", 6)  # every layout: 2 or 3 texts, a table after either or none
    bank = PrefixBank(model, engine, pages)
    # the positions the layout grammar leaves open beside the characters: whether the page goes on after
    # its second text (and after a third), and the height of the block on row 6 (a text's 7, a table's 8)
    tok = processor.tokenizer
    assert {tuple(b.label for b in p.blocks[1:]) for p in pages} == {
        ("Text", "Text"),
        ("Text", "Text", "Table"),
        ("Text", "Text", "Text"),
        ("Text", "Text", "Text", "Table"),
    }
    for row, page in zip(bank.rows, pages, strict=True):
        third = [b.label for b in page.blocks if b.row == 6]
        assert len(row.choices) == 1 + len(third) + (third == ["Text"])
        got = [tok.decode([int(row.labels[j])]) for j in row.choices]
        expected = ["<" if third else "<|im_end|>"] + ["8" if third == ["Table"] else "7"] * len(third)
        if third == ["Text"]:
            expected.append("<" if page.blocks[-1].label == "Table" else "<|im_end|>")
        assert got == expected, (page.answer, got)
    layers = model.model.language_model.layers
    peft = train_ocr(model, bank, OcrSpec(steps=3, batch_size=2, norm_lr=10.0))
    q1, k1 = layers[1].self_attn.q_norm.weight, layers[1].self_attn.k_norm.weight
    assert not torch.equal(q1, torch.ones_like(q1)) and not torch.equal(k1, torch.ones_like(k1))
    assert torch.equal(layers[0].self_attn.k_norm.weight, torch.ones_like(k1))  # the bank's keys: fixed
    saved = load_file(str(save_merged(peft, processor, tmp_path / "m") / "model.safetensors"))
    torch.testing.assert_close(saved["model.language_model.layers.1.self_attn.q_norm.weight"], q1)
    torch.testing.assert_close(saved["model.language_model.layers.1.self_attn.k_norm.weight"], k1)
