"""Train a LoRA adapter on synthetic screens with PEFT; deterministic from a seed."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_core.config import BUILTIN_TINY, DeploymentConfig
from moe_core.demo.screens import Screen, make_screen
from moe_core.engine import Engine, GenerationRequest

__all__ = ["LM_TARGETS", "TrainSpec", "evaluate_expert", "evaluate_router", "train_adapter"]

logger = logging.getLogger(__name__)

#: Language-model linears, the LM head, and the vision tower's linears of Qwen3-VL.
LM_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_TARGETS = r".*visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))|merger\.linear_fc(1|2))"


@dataclass(frozen=True)
class TrainSpec:
    name: str
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 16
    vision: bool = False  # vision-tower LoRA cannot join mixed-adapter batches (rows are patches)
    seed: int = 0
    lora_b_lr_ratio: float = 1.0  # LoRA+: a higher learning rate for B speeds up feature learning
    warmup_clean: float = 0.0  # share of steps that mostly see uncluttered screens (a curriculum)


Example = tuple[Screen, str, str]  # (screen, prompt, answer)


def train_adapter(
    cfg: DeploymentConfig,
    spec: TrainSpec,
    examples: Sequence[Example],
    out: Path,
    *,
    system_prompt: str,
    progress: Callable[[int, float], None] | None = None,
    init_from: Path | None = None,
) -> Path:
    """Train one LoRA on ``examples`` (starting from the LoRA in ``init_from`` if given); save it to ``out``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from moe_core.modeling import load_model, load_processor

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    model = load_model(cfg.base_model, dtype=torch.float32, device=torch.device("cpu"))
    processor = load_processor(cfg.base_model)
    targets = LM_TARGETS + "|lm_head" + ("|" + VISION_TARGETS if spec.vision else "")
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.rank, target_modules=targets, lora_dropout=0.0)
    if init_from is not None:  # warm start: same shapes, weights from a shared grounding adapter
        peft = PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
    else:
        peft = get_peft_model(model, lora)
    peft.train()
    enc = Engine(peft, processor, system_prompt=system_prompt, image_size=cfg.limits.image_size)
    end = "<|im_end|>"
    params_a = [p for n, p in peft.named_parameters() if p.requires_grad and "lora_B" not in n]
    params_b = [p for n, p in peft.named_parameters() if p.requires_grad and "lora_B" in n]
    opt = torch.optim.AdamW(
        [{"params": params_a, "lr": spec.lr}, {"params": params_b, "lr": spec.lr * spec.lora_b_lr_ratio}],
        lr=spec.lr,
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec.steps))
    t0 = time.perf_counter()
    for step in range(spec.steps):
        batch = [
            _sample(examples, rng, step < spec.warmup_clean * spec.steps) for _ in range(spec.batch_size)
        ]
        answers = [a + end for _, _, a in batch]
        inputs = enc.encode([s.image for s, _, _ in batch], [p for _, p, _ in batch], answers=answers,
                            padding_side="right")  # fmt: skip
        labels = _answer_labels(inputs, [len(processor.tokenizer.encode(a)) for a in answers])
        loss = peft(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None and (step % 50 == 0 or step == spec.steps - 1):
            progress(step, float(loss))
    logger.info("adapter %s: trained %d steps in %.1fs", spec.name, spec.steps, time.perf_counter() - t0)
    peft.peft_config["default"].base_model_name_or_path = (
        BUILTIN_TINY if cfg.base_model.id == BUILTIN_TINY else cfg.base_model.id
    )
    peft.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out


def _lr_factor(step: int, steps: int) -> float:
    """Warm up for 20 steps, then decay linearly."""
    return min(1.0, (step + 1) / 20) * (1 - step / steps)


def _sample(examples: Sequence[Example], rng: random.Random, warmup: bool) -> Example:
    """An example; during the warm-up, three in four are the same screen without its clutter."""
    screen, prompt, answer = examples[rng.randrange(len(examples))]
    if warmup and rng.random() < 0.75:
        return make_screen(screen.kind, screen.seed, clutter=False), prompt, answer
    return screen, prompt, answer


def _answer_labels(inputs: Any, answer_lens: list[int]) -> torch.Tensor:
    """Loss only on the answer tokens: everything else is -100. Rows are right-padded."""
    ids = inputs["input_ids"]  # [batch, seq]
    labels = torch.full_like(ids, -100)
    lengths = inputs["attention_mask"].sum(-1)
    for i, n in enumerate(answer_lens):
        end = int(lengths[i])
        labels[i, end - n : end] = ids[i, end - n : end]
    return labels


def evaluate_expert(
    engine: Engine, adapter: str | None, screens: Sequence[Screen], batch_size: int = 16
) -> float:
    """Exact-match accuracy of the expert's action on ``screens`` (mixed-batch generation)."""
    correct = 0
    for i in range(0, len(screens), batch_size):
        chunk = screens[i : i + batch_size]
        reqs = [GenerationRequest(s.image, s.prompt, adapter, max_new_tokens=10) for s in chunk]
        correct += sum(r.text == s.answer for r, s in zip(engine.generate(reqs), chunk, strict=True))
    return correct / max(1, len(screens))


def evaluate_router(
    engine: Engine, adapter: str, labels: Sequence[str], prompt: str, screens: Sequence[Screen]
) -> float:
    """Share of screens the routing adapter classifies as their own type."""
    hits = sum(engine.classify(s.image, prompt, labels, adapter).label == s.kind for s in screens)
    return hits / max(1, len(screens))
