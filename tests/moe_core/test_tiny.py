from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moe_core.storage.layout import sha256_file
from moe_core.tiny import build_tiny_model


def test_builds_deterministically(tmp_path: Path, tiny_path: Path) -> None:
    other = build_tiny_model(out=tmp_path / "again")
    for f in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert sha256_file(other / f) == sha256_file(tiny_path / f), f
    assert build_tiny_model(out=tmp_path / "again") == other  # cached: no rebuild


RELOAD = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor
p = sys.argv[1]
proc = AutoProcessor.from_pretrained(p)
model = AutoModelForImageTextToText.from_pretrained(p)
saved = load_file(p + "/model.safetensors")
state = model.state_dict()
assert all(torch.equal(state[k], v) for k, v in saved.items()), "weights differ"
print(type(proc).__name__, type(proc.tokenizer).__name__, type(model).__name__, len(saved))
"""


def test_reloads_offline_with_identical_weights(tiny_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tiny_path)], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[:3] == ["Qwen3VLProcessor", "Qwen2Tokenizer", "Qwen3VLForConditionalGeneration"]
