"""The embedded default: a tiny Qwen3-VL built offline and deterministically.

``builtin:tiny-qwen3-vl`` resolves to an ordinary Hugging Face folder (config, safetensors weights,
byte-level BPE tokenizer, Qwen3-VL processor and chat template) that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load back with ``HF_HUB_OFFLINE=1``. Same code paths as the 8B model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["TINY_SPEC", "build_tiny_model", "tiny_model_dir"]

logger = logging.getLogger(__name__)

#: Everything that decides the tiny model's bytes. Changing it changes the cache key.
TINY_SPEC: dict[str, Any] = {
    "seed": 1234,
    "vocab_size": 640,
    "text": {
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [6, 3, 3],
            "mrope_interleaved": True,
        },
        "max_position_embeddings": 4096,
    },
    "vision": {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 96,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [1],
    },
    # Random init leaves image tokens nearly identical (position swamped by content); a stronger
    # position table gives the tiny model's visual tokens a usable sense of where they are.
    "vision_pos_std": 0.5,
    "format": 1,
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer: digits split one by one, words keep a leading space.
QWEN2_PRETOKENIZE_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# A Qwen3-VL-Instruct-shaped template: an image item renders as <|vision_start|><|image_pad|><|vision_end|>;
# tools, assistant tool calls and tool results render as Qwen3-VL-Instruct's own template renders them
# (the tools as JSON in the system message, calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>,
# consecutive tool results in one user message as <tool_response> blocks). Without tools the text is what
# the template rendered before it knew them.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- render(messages[0]['content']) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' -}}'
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + render(message['content']) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) -}}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- if (loop.first and message['content']) or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if tool_call['function'] -%}{%- set tool_call = tool_call['function'] -%}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' -}}"
    "{%- if tool_call['arguments'] is string -%}{{- tool_call['arguments'] -}}"
    "{%- else -%}{{- tool_call['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: prompts, screen names and the action grammar of the demo."""
    from moe_core.config import DEFAULT_SYSTEM_PROMPT

    screens = ["calendar", "claim-window", "login-window", "chart-screen", "appointment", "desktop", "router"]
    ui = ["Click", "the", "button", "Save", "Submit", "Login", "Sign in", "Open", "Cancel", "OK", "Next"]
    things = ["month", "day", "cell", "bar", "slot", "icon", "field", "form", "time"]
    actions = ["click", "type", "scroll", "press", "none", "user", "assistant", "system", "screenshot"]
    words = [*screens, *ui, "Which screen is this?", *things, *actions]
    lines = [DEFAULT_SYSTEM_PROMPT, *words]
    for x in range(10):
        for y in range(10):
            lines.append(f"click({x}, {y})")
    lines += [f"Click the {w} button" for w in ("Save", "Submit", "Login", "Open", "Cancel", "OK", "Next")]
    lines += [f"Click day {d}" for d in range(1, 32)]
    return lines * 4


def _build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]
        unk_token=None,  # type: ignore[arg-type]
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    return tok


def _build_processor(tokenizer: Any, spec: dict[str, Any]) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    v = spec["vision"]
    common = {
        "patch_size": v["patch_size"],
        "temporal_patch_size": v["temporal_patch_size"],
        "merge_size": v["spatial_merge_size"],
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    pixels = v["patch_size"] * v["spatial_merge_size"]
    image_processor = Qwen2VLImageProcessor(
        **common, size={"shortest_edge": 4 * pixels * pixels, "longest_edge": 1024 * pixels * pixels}
    )
    video_processor = Qwen3VLVideoProcessor(**common)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _build_model(tokenizer: Any, spec: dict[str, Any]) -> Any:
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = dict(spec["text"], vocab_size=len(tokenizer))
    text.update(
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(spec["vision"]),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec["seed"])
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        model.model.visual.pos_embed.weight.normal_(0.0, spec["vision_pos_std"])
    eos = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=ids("<|endoftext|>"), do_sample=False, max_new_tokens=24
    )
    return model


def _cache_root() -> Path:
    return Path(os.environ.get("MOE_CACHE_DIR", Path.home() / ".cache" / "moe-inference-server"))


def tiny_model_dir(spec: dict[str, Any] | None = None) -> Path:
    """The folder the tiny model for ``spec`` lives in (built or not)."""
    # the chat template is part of the folder's bytes too: a new template is a new folder (same weights)
    parts = {"spec": spec or TINY_SPEC, "chat_template": CHAT_TEMPLATE}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return _cache_root() / "models" / f"tiny-qwen3-vl-{key}"


def build_tiny_model(spec: dict[str, Any] | None = None, out: Path | None = None) -> Path:
    """Build the tiny Qwen3-VL into the cache (or ``out``) once; later calls return the folder at once.

    The folder appears by an atomic rename, so a killed build never leaves a half model behind.
    """
    spec = spec or TINY_SPEC
    target = out or tiny_model_dir(spec)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        tokenizer = _build_tokenizer(spec["vocab_size"])
        processor = _build_processor(tokenizer, spec)
        model = _build_model(tokenizer, spec)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its folder is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built tiny Qwen3-VL at %s in %.1fs", target, time.perf_counter() - t0)
    return target
