"""The sections of ``config/deployment.yaml`` that a model needs: the base model, request limits, the
engine, the experts' output grammars, and the merge job."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from moe_core.config.base import AdapterName, StrictModel
from moe_core.structured import Constraint, GrammarError

__all__ = [
    "BUILTIN_TINY",
    "CPU_KV_CACHE_BYTES",
    "IMAGE_FORMATS",
    "BaseModelConfig",
    "EngineConfig",
    "LimitsConfig",
    "MergeJobConfig",
    "OutputGrammar",
]

# Every setting is declared as Field(default, bounds, description=...) (STYLE.md 3), so the models' field
# blocks share a shape, here and across moe_core/config/: each declares other settings, none is a duplicate.

#: The embedded default: a tiny Qwen3-VL built offline by :mod:`moe_core.tiny`.
BUILTIN_TINY = "builtin:tiny-qwen3-vl"


class BaseModelConfig(StrictModel):
    id: str = Field(
        default=BUILTIN_TINY,
        description=f"Base model: a Hugging Face id, a local folder, or {BUILTIN_TINY!r} (built offline).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        default=False, description="Allow code shipped with the checkpoint to run. Off unless asked."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Serving dtype; auto is bfloat16 on CUDA and float32 on the CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Device; auto is cuda when available, else cpu."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa", description="Attention kernel passed to transformers."
    )
    image_patch_size: int = Field(
        default=16,
        ge=1,
        description="The vision tower's patch size (16 for Qwen3-VL, 14 for Qwen2.5-VL); images land on a grid "
        "of twice this (the spatial merge). Checked against the processor at load.",
    )


#: The image formats accepted by default: what screenshots and documents arrive as.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class LimitsConfig(StrictModel):
    max_image_pixels: int = Field(default=1024 * 1024, ge=1, description="Largest image (width*height).")
    max_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1, description="Largest decoded image file.")
    max_body_bytes: int = Field(
        default=24 * 1024 * 1024,
        ge=1024,
        description="Largest request body the gateway reads (a base64 image is 4/3 of its file); larger "
        "bodies get a 413 before they are read.",
    )
    # same shape as ScalingConfig's fields (sections.py), different settings: not a duplicate
    max_prompt_chars: int = Field(default=4000, ge=1, description="Longest prompt in characters.")
    max_new_tokens: int = Field(default=24, ge=1, description="Tokens generated per request.")
    max_batch_size: int = Field(
        default=16, ge=1, description="Most requests decoding at once in one replica (rows of one forward)."
    )
    max_queued_requests: int = Field(
        default=64,
        ge=0,
        description="Requests a replica queues beyond the running ones; more are refused with a 503 at once.",
    )
    max_completion_tokens: int = Field(
        default=512, ge=1, description="The most tokens a request may ask to generate (max_tokens)."
    )
    min_pixels: int = Field(
        default=64 * 32 * 32,
        ge=1,
        description="Fewest pixels the model sees of an image: smaller ones are scaled up, keeping their "
        "aspect ratio (Qwen's min_pixels; a request may ask for more, within max_pixels).",
    )
    max_pixels: int = Field(
        default=1024 * 32 * 32,
        ge=1,
        description="Most pixels the model sees of an image: larger ones are scaled down, keeping their aspect "
        "ratio (Qwen's max_pixels; a request may ask for fewer). Image tokens = pixels / (2 * patch)^2.",
    )
    max_prompt_tokens: int = Field(
        default=4096,
        ge=1,
        description="Longest prompt in tokens, the image's tokens and the chat template included.",
    )
    image_formats: list[str] = Field(
        default_factory=lambda: list(IMAGE_FORMATS),
        min_length=1,
        description="Image file formats accepted (Pillow's names), told from the file's header before any "
        "decoder runs: no other decoder is reachable (TIFF, TGA, ICO, DDS, EPS, which hands files to "
        "Ghostscript, ...). Anything else is a 400 naming the image's field.",
    )

    @field_validator("image_formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        names = [f.upper() for f in v]
        unknown = sorted(set(names) - set(Image.OPEN))
        if unknown:
            raise ValueError(f"limits.image_formats: {unknown} are not formats Pillow reads")
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _pixels(self) -> Self:
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"limits.min_pixels ({self.min_pixels}) must not exceed limits.max_pixels ({self.max_pixels})"
            )
        return self


#: The KV cache pool on the CPU when ``engine.kv_cache_bytes`` is not set.
CPU_KV_CACHE_BYTES = 64 * 2**20


class EngineConfig(StrictModel):
    """The engine's memory and step scheduling: the paged KV cache, prefix caching, chunked prefill."""

    kv_cache_bytes: int | None = Field(
        default=None,
        ge=2**20,
        description="Bytes of the KV cache pool, allocated at start in pages (keys and values of every layer). "
        "null: kv_cache_memory_fraction of the device memory free after the model loads on CUDA, 64 MiB on "
        "the CPU. Requests are admitted while their pages fit; the youngest rows are preempted (and resumed "
        "later) when decoding runs out of pages.",
    )
    # same shape as StorageConfig's fields (storage.py), different settings: not a duplicate
    kv_cache_memory_fraction: float = Field(
        default=0.8,
        gt=0,
        le=0.95,
        description="On CUDA with kv_cache_bytes null: the share of the device memory free once the model "
        "loads that the KV cache takes; LoRA slots and activations share the rest.",
    )
    page_tokens: int = Field(
        default=16, ge=1, le=1024, description="Tokens per KV cache page (vLLM's block size)."
    )
    prefix_caching: bool = Field(
        default=True,
        description="Share full KV pages between requests with the same prefix (same model and adapter "
        "version, same tokens, same images by content): an agent's next turn reuses its history's pages and "
        "skips the vision tower for screenshots already seen.",
    )
    max_prefill_tokens_per_step: int = Field(
        default=512,
        ge=1,
        description="Prompt tokens read per engine step (chunked prefill): a long prompt is read in chunks, "
        "and decoding rows get a token at every step in between.",
    )
    vision_cache_images: int = Field(
        default=32,
        ge=0,
        description="Images whose vision-tower features each engine keeps (by content and vision identity).",
    )
    grammar_cache_size: int = Field(
        default=128,
        ge=0,
        description="Compiled grammars (structured outputs, tool calls, the experts' output grammars) each "
        "engine keeps, least recently used out first; a grammar not kept is compiled again.",
    )
    step: Literal["auto", "eager", "static", "compile", "cuda_graphs"] = Field(
        default="auto",
        description="How a decode step (every row decoding one token) runs. eager: the variable-shape step. "
        "static: padded to a batch-size bucket (1, 2, 4, 8, 16, 32), with no branch on data and no host sync "
        "inside, run eagerly. compile: that step through torch.compile (inductor; compiled per bucket on first "
        "use). cuda_graphs: that step captured as a CUDA graph per bucket on first use and replayed (CUDA "
        "only). auto: cuda_graphs on CUDA, eager on the CPU, where compile runs a step in 0.55-0.7x the time "
        "(python -m benchmarks --only step) but spends seconds compiling each bucket at its first use.",
    )


class OutputGrammar(StrictModel):
    """An expert's answer grammar: exactly one of ``regex``, ``json_schema``, ``choice``. Applied to every
    answer of that expert unless the request brings its own (a response format, structured outputs, or
    tools the model may call)."""

    regex: str | None = Field(
        default=None, description="The answer matches this regular expression (Rust syntax)."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="The answer is JSON valid against this schema (checked when the config loads).",
    )
    choice: list[str] | None = Field(
        default=None, min_length=1, description="The answer is one of these strings."
    )

    @model_validator(mode="after")
    def _one_that_compiles(self) -> Self:
        given = [k for k in ("regex", "json_schema", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of regex, json_schema, choice (got {given or 'none'})")
        import llguidance

        try:
            error = llguidance.LLMatcher.validate_grammar(self.constraint("").grammar_text())
        except GrammarError as e:
            error = str(e)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"{given[0]} does not compile: {error.strip()}")
        return self

    def constraint(self, adapter: str) -> Constraint:
        param = f"outputs.{adapter}"
        if self.regex is not None:
            return Constraint.regex(self.regex, param)
        if self.json_schema is not None:
            return Constraint.json_schema(self.json_schema, param)
        return Constraint.choice(self.choice or [], param)


class MergeJobConfig(StrictModel):
    safe_merge: bool = Field(default=True, description="Refuse merges that produce NaN or Inf.")
    max_logit_diff: float = Field(
        default=1e-3, ge=0.0, description="Largest allowed logit difference merged vs base+LoRA on probes."
    )
    min_greedy_agreement: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of probes whose greedy outputs must agree."
    )
    num_probes: int = Field(default=8, ge=1, description="Probe inputs run through both models.")
    probe_set: AdapterName = Field(
        default="default",
        description="Probe set in storage (probes/<name>/) that verifies a merge when the adapter has no "
        "probe set of its own (probes/<adapter>/); a merge with neither is refused.",
    )
    gpu: float = Field(default=0.0, ge=0.0, description="GPUs for the merge task (0 on the CPU default).")
    cpu: float = Field(default=1.0, ge=0.0, description="CPUs for the merge task.")
    kv_cache_bytes: int = Field(
        default=256 * 2**20,
        ge=2**20,
        description="KV cache of the merge task's engines: enough for the probes (not a serving replica's "
        "share of the GPU).",
    )
