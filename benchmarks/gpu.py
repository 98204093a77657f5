"""The GPU benchmark: a Qwen3-VL with the real 8B shapes (random bf16 weights) on one CUDA device.

Measures batch-1 latency and decode time per token for base, merged and base + one LoRA; 16 requests
over 8 adapters (mixed batch, single-adapter batch, serial with switching); adapter cold load; merge
time; and decode per token against the memory-bandwidth floor (weight bytes / HBM bandwidth).
The tiny model's processor supplies tokens and image patches (same patch 16, merge 2 as the 8B).
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.core import BenchSettings, Samples
from merge_jobs.merge import merge_loaded
from moe_core.config import DEFAULT_SYSTEM_PROMPT, BaseModelConfig, DeploymentConfig, EngineSettings
from moe_core.engine import Engine, GenerationRequest
from moe_core.modeling import LM_TARGETS

__all__ = ["HBM_TB_S", "gpu_benchmarks", "qwen3_vl_8b_config"]

HBM_TB_S = {"H100": 3.35, "H200": 4.8}


def qwen3_vl_8b_config(tokenizer: Any) -> Any:
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config={
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 4096,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _sync_timed(fn: Any) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def gpu_benchmarks(rounds: int = 5) -> tuple[Samples, dict[str, Any], BenchSettings]:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from moe_core.modeling import load_processor
    from moe_demo.screens import SCREEN_TYPES, split

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    s = BenchSettings(rounds=rounds)
    dev = torch.device("cuda")
    processor = load_processor(DeploymentConfig().base_model)
    cfg = qwen3_vl_8b_config(processor.tokenizer)
    figures: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        base = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()  # type: ignore[arg-type]
    figures["build_model_s"] = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    lm_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "visual" not in n)
    bw = next((v for k, v in HBM_TB_S.items() if k in figures["device"]), 3.35)
    figures |= {
        "weights_gb": weight_bytes / 1e9,
        "lm_weights_gb": lm_bytes / 1e9,
        "hbm_tb_s": bw,
        "decode_floor_ms": lm_bytes / (bw * 1e12) * 1000,
    }
    tmp = Path(tempfile.mkdtemp(prefix="moe-gpu-bench-"))
    loras = []
    for i in range(s.adapters_in_batch + 2):
        peft = get_peft_model(
            base,
            LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=LM_TARGETS, init_lora_weights="gaussian"),
        )
        peft.save_pretrained(str(tmp / f"l{i}"))
        base = peft.unload()
        loras.append(tmp / f"l{i}")
    screens = split("heldout", 3, SCREEN_TYPES)
    image_size = 448
    settings = EngineSettings(
        base_model=BaseModelConfig(),
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        max_new_tokens=s.new_tokens,
        min_pixels=image_size * image_size,
        max_pixels=image_size * image_size,
        max_prompt_tokens=4096,
    )
    engine = Engine(base, processor, settings, name="gpu")
    for i in range(s.adapters_in_batch):
        engine.load_adapter(f"a{i}", loras[i])
    prompt = screens[0].prompt
    one = [GenerationRequest(screens[0].image, prompt, None)]
    dyn = [GenerationRequest(screens[0].image, prompt, "a0")]
    mixed = [
        GenerationRequest(screens[i % len(screens)].image, prompt, f"a{i % s.adapters_in_batch}")
        for i in range(s.batch)
    ]
    single = [GenerationRequest(r.image, prompt, "a0") for r in mixed]

    def gen(reqs: list[GenerationRequest], n: int) -> None:
        engine.generate(reqs, exact_tokens=n)

    samples: Samples = {}
    for _ in range(2):
        gen(one, s.new_tokens)
        gen(dyn, s.new_tokens)
    for _ in range(rounds):
        for key, reqs in (("base", one), ("dynamic", dyn)):
            full, first = (
                _sync_timed(lambda r=reqs: gen(r, s.new_tokens)),
                _sync_timed(lambda r=reqs: gen(r, 1)),
            )
            samples.setdefault(f"latency_{key}", []).append(full)
            samples.setdefault(f"decode_per_token_{key}", []).append((full - first) / (s.new_tokens - 1))
        samples.setdefault("batch_mixed", []).append(_sync_timed(lambda: gen(mixed, s.new_tokens)))
        samples.setdefault("batch_single", []).append(_sync_timed(lambda: gen(single, s.new_tokens)))

    def serial() -> None:  # one request at a time: one adapter per call takes PEFT's set_adapter path
        for r in mixed:
            gen([r], s.new_tokens)

    samples["serial_switching"] = [_sync_timed(serial) for _ in range(max(1, rounds // 2))]

    def cold(name: str, path: Path) -> None:
        engine.load_adapter(name, path)
        gen([GenerationRequest(screens[0].image, prompt, name)], s.new_tokens)

    for i in range(2):
        name = f"cold{i}"
        samples.setdefault("cold_request", []).append(
            _sync_timed(partial(cold, name, loras[s.adapters_in_batch + i]))
        )
        warm = [GenerationRequest(screens[0].image, prompt, name)]
        samples.setdefault("warm_request", []).append(_sync_timed(partial(gen, warm, s.new_tokens)))
        engine.unload_adapter(name)
    for name in list(engine.adapters):
        engine.unload_adapter(name)
    # merge: fp32 copy of the LM is too large to double on one GPU, so merge in bf16 on the device
    t0 = time.perf_counter()
    engine.load_adapter("m", loras[0])
    merge_loaded(engine, "m", safe_merge=True)
    torch.cuda.synchronize()
    figures["merge_s"] = time.perf_counter() - t0
    for _ in range(rounds):
        full, first = _sync_timed(lambda: gen(one, s.new_tokens)), _sync_timed(lambda: gen(one, 1))
        samples.setdefault("latency_merged", []).append(full)
        samples.setdefault("decode_per_token_merged", []).append((full - first) / (s.new_tokens - 1))
    figures["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    figures["image_size"] = image_size
    return samples, figures, s
