"""Train a LoRA adapter on synthetic screens with PEFT; deterministic from a seed.

Only the language model gets LoRA: the engine mixes adapters per request row, which the vision
tower cannot do (its rows are image patches). The vision tower is therefore frozen, so each example
is tokenized and its image features are computed once (:class:`FeatureBank`), and every training
step feeds them back through the model's ``mm_encoder_outputs`` input instead of re-running the
processor and the vision tower. The loss is the same as on the pixel path (tested); a step costs
about 40% as much on CPU.

Reading experts (``ocr``) answer with text, one token per character, each read off one image token.
Two things make that learnable for the tiny model: the LM head's LoRA learns at ``head_lr`` times the
learning rate (the characters' signal in the last hidden state is small, and at the common rate the head
learns it far too slowly), and ``attend`` adds a loss that points the last layer's first heads at the
image token holding the character the step predicts (attention supervision; training only, the adapter
is an ordinary LoRA). Without it the expert stayed near chance on every character in our trials.
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

__all__ = [
    "FeatureBank",
    "TrainSpec",
    "char_accuracy",
    "evaluate_expert",
    "evaluate_reader",
    "evaluate_router",
    "train_adapter",
]

logger = logging.getLogger(__name__)

END = "<|im_end|>"
#: Heads of the last layer that the attention loss (``TrainSpec.attend``) supervises.
ATTEND_HEADS = (0, 1)


@dataclass(frozen=True)
class TrainSpec:
    name: str
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 16
    seed: int = 0
    warmup_clean: float = 0.0  # share of steps that mostly see uncluttered screens (a curriculum)
    head_lr: float = 1.0  # the LM head's LoRA learns at lr * head_lr
    attend: float = 0.0  # weight of the attention loss on reading screens (0: none)


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
    looks: tuple[tuple[int, int], ...] = ()  # reading screens: (query, key) positions, one per character


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
        engine = Engine(
            model, self.processor, cfg.engine_settings.model_copy(update={"system_prompt": system_prompt})
        )
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
        image_id = int(tok.convert_tokens_to_ids("<|image_pad|>"))
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
                ids = inputs["input_ids"][j, :n].clone()
                answer_len = len(tok.encode(answer))
                grid = inputs["image_grid_thw"][j].clone()
                rows.append(
                    _Row(
                        input_ids=ids,
                        mm_token_type_ids=inputs["mm_token_type_ids"][j, :n].clone(),
                        grid_thw=grid,
                        answer_len=answer_len,
                        image=vision.pooler_output[j].clone(),
                        deepstack=tuple(d[j].clone() for d in vision.deepstack_features),
                        looks=_looks(part[j][0], part[j][2], ids, grid, answer_len, image_id),
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


def _looks(
    screen: Screen, answer: str, ids: torch.Tensor, grid: torch.Tensor, answer_len: int, image_id: int
) -> tuple[tuple[int, int], ...]:
    """(query, key) positions for the attention loss: the step that predicts character ``i`` of a
    reading screen's text, and the image token its glyph sits in. Empty unless ``answer`` is that text
    (other screens, or the routing adapter's examples)."""
    if not screen.glyphs or answer != screen.text:
        return ()
    if answer_len != len(screen.glyphs) + 1:  # one token per character, then <|im_end|>
        raise ValueError(
            f"{screen.kind} {screen.seed}: answer {screen.text!r} is not one token per character"
        )
    merge = 2  # Qwen3-VL's spatial merge: an image token is 2 x 2 patches
    rows, cols = int(grid[1]) // merge, int(grid[2]) // merge
    first = int((ids == image_id).nonzero()[0])
    start = len(ids) - answer_len  # the answer's first token
    return tuple(
        (start + i - 1, first + min(rows - 1, int(y * rows)) * cols + min(cols - 1, int(x * cols)))
        for i, (x, y) in enumerate(screen.glyphs)
    )


def _attention_loss(attentions: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
    """Mean negative log attention that the supervised heads give each character's image token."""
    picks = [attentions[b, list(ATTEND_HEADS), q, k].mean() for b, r in enumerate(rows) for q, k in r.looks]
    if not picks:
        return attentions.new_zeros(())
    return -torch.log(torch.stack(picks) + 1e-6).mean()


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
    attend = spec.attend > 0 and any(r.looks for r in bank.rows)
    base = cfg.base_model.model_copy(update={"attn_implementation": "eager"}) if attend else cfg.base_model
    model = load_model(base, dtype=torch.float32, device=torch.device("cpu"))  # eager: attention weights out
    lora = LoraConfig(
        r=spec.rank, lora_alpha=spec.rank, target_modules=LM_TARGETS + "|lm_head", lora_dropout=0.0
    )
    peft = get_peft_model(model, lora)
    peft.train()
    params = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [p for _, p in params], "lr": spec.lr}]
    if spec.head_lr != 1.0:
        groups = [
            {"params": [p for n, p in params if "lm_head" not in n], "lr": spec.lr},
            {"params": [p for n, p in params if "lm_head" in n], "lr": spec.lr * spec.head_lr},
        ]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec.steps))
    t0 = time.perf_counter()
    clean_steps = spec.warmup_clean * spec.steps if bank.clean_rows else 0
    for step in range(spec.steps):
        rows = []
        for _ in range(spec.batch_size):
            k = rng.randrange(len(bank))
            # during the warm-up, three in four examples are the same screen without its clutter
            rows.append(bank.clean_rows[k] if step < clean_steps and rng.random() < 0.75 else bank.rows[k])
        if attend:
            result = peft(**bank.batch(rows), output_attentions=True)
            loss = result.loss + spec.attend * _attention_loss(result.attentions[-1], rows)
        else:
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


def _answers(engine: Engine, adapter: str | None, screens: Sequence[Screen], batch_size: int) -> list[str]:
    """The adapter's answers to ``screens`` (greedy, mixed-batch generation)."""
    texts: list[str] = []
    for i in range(0, len(screens), batch_size):
        chunk = screens[i : i + batch_size]
        reqs = [GenerationRequest(s.image, s.prompt, adapter, max_new_tokens=10) for s in chunk]
        texts += [r.text for r in engine.generate(reqs)]
    return texts


def evaluate_expert(
    engine: Engine, adapter: str | None, screens: Sequence[Screen], batch_size: int = 16
) -> float:
    """Exact-match accuracy of the expert's answer (an action, or the text read) on ``screens``."""
    answers = _answers(engine, adapter, screens, batch_size)
    return sum(a == s.answer for a, s in zip(answers, screens, strict=True)) / max(1, len(screens))


def evaluate_reader(
    engine: Engine, adapter: str | None, screens: Sequence[Screen], batch_size: int = 16
) -> tuple[float, float]:
    """A reading expert's exact match and character accuracy (:func:`char_accuracy`) on ``screens``."""
    answers = _answers(engine, adapter, screens, batch_size)
    exact = sum(a == s.answer for a, s in zip(answers, screens, strict=True)) / max(1, len(screens))
    return exact, char_accuracy(answers, [s.answer for s in screens])


def char_accuracy(outputs: Sequence[str], truths: Sequence[str]) -> float:
    """1 - total edit distance / total characters of the truths (1 - CER), at least 0."""
    errors = sum(_edit_distance(o, t) for o, t in zip(outputs, truths, strict=True))
    return max(0.0, 1.0 - errors / max(1, sum(len(t) for t in truths)))


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def evaluate_router(
    engine: Engine, adapter: str, labels: Sequence[str], prompt: str, screens: Sequence[Screen]
) -> float:
    """Share of screens the routing adapter classifies as their own type."""
    hits = sum(engine.classify(s.image, prompt, labels, adapter).label == s.kind for s in screens)
    return hits / max(1, len(screens))
