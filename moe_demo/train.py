"""Train a LoRA adapter on synthetic screens with PEFT; deterministic from a seed.

Only the language model gets LoRA: the engine mixes adapters per request row, which the vision
tower cannot do (its rows are image patches). The vision tower is therefore frozen, so each example
is tokenized and its image features are computed once (:class:`FeatureBank`), and every training
step feeds them back through the model's ``mm_encoder_outputs`` input instead of re-running the
processor and the vision tower. The loss is the same as on the pixel path (tested); a step costs
about 40% as much on CPU.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_core.config import DeploymentConfig
from moe_core.engine import Engine, GenerationRequest
from moe_core.modeling import LM_TARGETS, base_model_id
from moe_demo.screens import Screen, make_screen

__all__ = ["FeatureBank", "TrainSpec", "evaluate_expert", "evaluate_router", "train_adapter"]

logger = logging.getLogger(__name__)

END = "<|im_end|>"


@dataclass(frozen=True)
class TrainSpec:
    name: str
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 16
    seed: int = 0
    warmup_clean: float = 0.0  # share of steps that mostly see uncluttered screens (a curriculum)


Example = tuple[Screen, str, str]  # (screen, prompt, answer)


@dataclass(frozen=True)
class _Row:
    """One tokenized example with its image features from the frozen vision tower."""

    input_ids: torch.Tensor  # [n], unpadded: chat prompt with the image tokens, then the answer
    mm_token_type_ids: torch.Tensor  # [n]
    grid_thw: torch.Tensor  # [3]
    answer_len: int  # trailing tokens the loss is taken on (the answer and <|im_end|>)
    image: torch.Tensor  # [image tokens, hidden]
    deepstack: tuple[torch.Tensor, ...]  # one [image tokens, hidden] per deepstack layer


class FeatureBank:
    """Training examples encoded once: token ids, and image features of the frozen vision tower.

    With ``clean`` each example also gets its uncluttered twin (the same screen with only the
    target drawn), which the curriculum samples early in training. Features come from an fp32 CPU
    copy of the base model, the dtype and device :func:`train_adapter` trains in.
    """

    def __init__(
        self,
        cfg: DeploymentConfig,
        examples: Sequence[Example],
        *,
        system_prompt: str,
        clean: bool = False,
        chunk: int = 32,
        name: str = "adapter",
    ) -> None:
        from moe_core.modeling import load_model, load_processor

        t0 = time.perf_counter()
        model = load_model(cfg.base_model, dtype=torch.float32, device=torch.device("cpu"))
        self.processor = load_processor(cfg.base_model)
        self.pad_id = int(self.processor.tokenizer.pad_token_id)
        engine = Engine(model, self.processor, cfg.engine.model_copy(update={"system_prompt": system_prompt}))
        self.rows = self._encode(engine, examples, chunk)
        twins = [(make_screen(s.kind, s.seed, clutter=False), p, a) for s, p, a in examples] if clean else []
        self.clean_rows = self._encode(engine, twins, chunk)
        logger.info(
            "adapter %s: encoded %d examples (%d clean twins) in %.1fs",
            name,
            len(self.rows),
            len(self.clean_rows),
            time.perf_counter() - t0,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def _encode(self, engine: Engine, examples: Sequence[Example], chunk: int) -> list[_Row]:
        rows: list[_Row] = []
        tok = self.processor.tokenizer
        for i in range(0, len(examples), chunk):
            part = examples[i : i + chunk]
            answers = [a + END for _, _, a in part]
            inputs = engine.encode(
                [s.image for s, _, _ in part], [p for _, p, _ in part], answers=answers, padding_side="right"
            )
            vision = engine.image_features(inputs)
            lengths = inputs["attention_mask"].sum(-1).tolist()
            for j, answer in enumerate(answers):
                n = int(lengths[j])
                rows.append(
                    _Row(
                        input_ids=inputs["input_ids"][j, :n].clone(),
                        mm_token_type_ids=inputs["mm_token_type_ids"][j, :n].clone(),
                        grid_thw=inputs["image_grid_thw"][j].clone(),
                        answer_len=len(tok.encode(answer)),
                        image=vision.pooler_output[j].clone(),
                        deepstack=tuple(d[j].clone() for d in vision.deepstack_features),
                    )
                )
        return rows

    def batch(self, rows: Sequence[_Row]) -> dict[str, Any]:
        """Model inputs for ``rows``: right-padded ids, labels on the answers, precomputed image features."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mm = torch.zeros((len(rows), width), dtype=rows[0].mm_token_type_ids.dtype)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n], mm[i, :n], mask[i, :n] = r.input_ids, r.mm_token_type_ids, 1
            labels[i, n - r.answer_len : n] = r.input_ids[n - r.answer_len :]
        features: dict[str, Any] = {  # per-image tuples, the shape get_image_features returns
            "pooler_output": tuple(r.image for r in rows),
            "deepstack_features": [
                tuple(r.deepstack[k] for r in rows) for k in range(len(rows[0].deepstack))
            ],
        }
        vision = BaseModelOutputWithDeepstackFeatures(**features)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": mm,
            "image_grid_thw": torch.stack([r.grid_thw for r in rows]),
            "mm_encoder_outputs": {"image": vision},
            "labels": labels,
        }


def train_adapter(
    cfg: DeploymentConfig,
    spec: TrainSpec,
    bank: FeatureBank,
    out: Path,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Train one language-model LoRA on the examples in ``bank``; save it to ``out`` (safetensors)."""
    from peft import LoraConfig, get_peft_model

    from moe_core.modeling import load_model

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    model = load_model(cfg.base_model, dtype=torch.float32, device=torch.device("cpu"))
    lora = LoraConfig(
        r=spec.rank, lora_alpha=spec.rank, target_modules=LM_TARGETS + "|lm_head", lora_dropout=0.0
    )
    peft = get_peft_model(model, lora)
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec.steps))
    t0 = time.perf_counter()
    clean_steps = spec.warmup_clean * spec.steps if bank.clean_rows else 0
    for step in range(spec.steps):
        rows = []
        for _ in range(spec.batch_size):
            k = rng.randrange(len(bank))
            # during the warm-up, three in four examples are the same screen without its clutter
            rows.append(bank.clean_rows[k] if step < clean_steps and rng.random() < 0.75 else bank.rows[k])
        loss = peft(**bank.batch(rows)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None and (step % 50 == 0 or step == spec.steps - 1):
            progress(step, float(loss.detach()))
    logger.info("adapter %s: trained %d steps in %.1fs", spec.name, spec.steps, time.perf_counter() - t0)
    peft.peft_config["default"].base_model_name_or_path = base_model_id(cfg.base_model)
    peft.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out


def _lr_factor(step: int, steps: int) -> float:
    """Warm up for 20 steps, then decay linearly."""
    return min(1.0, (step + 1) / 20) * (1 - step / steps)


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
