"""Typed configuration: `config/deployment.yaml` decides what is merged and what is dynamic.

Every model derives from :class:`StrictModel` (``extra="forbid"``, a description on every field), so a
misspelled key or a bad value fails at load with pydantic's field location and the offending value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moe_core.structured import Constraint, GrammarError
from moe_core.vision import PixelBounds

__all__ = [
    "ADAPTER_NAME_RE",
    "BUILTIN_TINY",
    "LIVE_FIELDS",
    "S3_SCHEMES",
    "AdapterName",
    "ApiConfig",
    "BaseModelConfig",
    "ConfigError",
    "DeploymentConfig",
    "DynamicConfig",
    "DynamicLive",
    "EngineConfig",
    "EngineSettings",
    "GatewayConfig",
    "GatewayLive",
    "LimitsConfig",
    "LiveSettings",
    "MergeJobConfig",
    "MergedAdapterConfig",
    "MergedConfig",
    "OutputGrammar",
    "PromotionConfig",
    "PromotionLive",
    "RouterConfig",
    "StorageConfig",
    "validate_adapter_name",
]

#: Adapter names double as storage path components and Serve deployment names.
ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

#: The embedded default: a tiny Qwen3-VL built offline by :mod:`moe_core.tiny`.
BUILTIN_TINY = "builtin:tiny-qwen3-vl"

DEFAULT_SYSTEM_PROMPT = (
    "You are a computer-use agent. You see a screenshot of the screen and control the mouse and "
    "keyboard. Answer with exactly one action, such as click(x, y)."
)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the field and the value."""


def validate_adapter_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise ``ValueError`` naming it."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid adapter name {name!r}: expected lower-case letters, digits and '-', "
            "starting with a letter or digit, at most 63 characters (pattern [a-z0-9][a-z0-9-]*)"
        )
    return name


AdapterName = Annotated[
    str,
    Field(pattern=ADAPTER_NAME_RE.pattern, description="Adapter name: [a-z0-9][a-z0-9-]*, at most 63."),
]


# The live fields' types, declared once: the config sections and the live models below share them.
PreferMerged = Annotated[bool, Field(description="Send to the merged deployment when one is up.")]
FallbackToDynamic = Annotated[
    bool, Field(description="Answer from the dynamic deployment when the merged one fails.")
]
ConfidenceThreshold = Annotated[
    float,
    Field(ge=0.0, le=1.0, description="Below this routing confidence the below_threshold rule applies."),
]
BelowThreshold = Annotated[
    Literal["base", "reject"],
    Field(
        description="When unsure: 'base' answers with the base model, 'reject' answers 422 with candidates."
    ),
]
DynamicAdapters = Annotated[
    list[AdapterName], Field(description="Adapters served only by the dynamic deployment.")
]
MaxLoadedAdapters = Annotated[
    int, Field(ge=1, description="LRU size: adapters resident in one replica at once.")
]
PromotionEnabled = Annotated[
    bool,
    Field(
        description="Give hot adapters a merged slot deployment and demote cold ones; off: every promoted "
        "adapter is demoted and the slots stay empty."
    ),
]
PromoteRps = Annotated[
    float,
    Field(
        gt=0,
        description="Requests/s, averaged over promote_window_s, at or above which an adapter is promoted.",
    ),
]
PromoteWindowS = Annotated[
    float,
    Field(
        gt=0,
        description="Seconds the promotion rate is averaged over; no promotion before the controller has "
        "seen this much traffic history, so a restart does not promote on a burst.",
    ),
]
DemoteRps = Annotated[
    float,
    Field(
        ge=0,
        description="Requests/s, averaged over demote_window_s, below which a promoted adapter is demoted; "
        "below promote_rps, so a rate between the two changes nothing (hysteresis).",
    ),
]
DemoteWindowS = Annotated[
    float,
    Field(
        gt=0,
        description="Seconds the demotion rate is averaged over, and the least time an adapter stays promoted.",
    ),
]
CooldownS = Annotated[
    float,
    Field(
        ge=0,
        description="Seconds after a switch during which neither that adapter nor that slot switches again: "
        "a merge costs minutes of GPU time, so a rate hovering at a threshold must not flap.",
    ),
]
DenyAdapters = Annotated[
    list[AdapterName], Field(description="Adapters never promoted (demoted when they hold a slot).")
]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Load and validate a YAML file; raise :class:`ConfigError` naming the file and field."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        return cls.from_dict(data or {}, source=str(p))

    @classmethod
    def from_dict(cls, data: object, source: str = "<dict>") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_describe(e)}") from e


def _section(data: dict[str, object], name: str) -> dict[str, object]:
    section = data.get(name)
    return section if isinstance(section, dict) else {}


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        if err["loc"]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        else:  # a cross-field rule: its message names the fields and values itself
            parts.append(str(err["msg"]).removeprefix("Value error, "))
    return "; ".join(parts)


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


#: URL schemes that name an S3-compatible store (s3fs); the other storage.* S3 fields apply to them only.
S3_SCHEMES = ("s3://", "s3a://")


class StorageConfig(StrictModel):
    """Shared storage: a local path (a ReadWriteMany volume) or an object store (``s3://bucket/prefix``).

    Credentials are never part of this file: on an object store they come from the standard AWS
    environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, a web-identity token,
    an instance role), which a Kubernetes Secret or a service-account annotation provides.
    """

    url: str = Field(
        default="storage",
        description="Storage root: a local path (relative to the working directory) or an fsspec URL "
        "such as s3://bucket/prefix (pip install .[s3]).",
    )
    keep_versions: int = Field(default=3, ge=1, description="Published versions kept per adapter.")
    cache_dir: str = Field(
        default=".cache/storage",
        description="Node-local cache of versions fetched from a remote root, content-addressed by the "
        "manifests' sha256 and shared by every replica on the node (a hostPath or local NVMe volume in "
        "Kubernetes). Unused for a local root, which is read in place.",
    )
    cache_max_gb: float = Field(
        default=200.0,
        gt=0,
        description="Bound of the node cache in GB (1e9 bytes): least recently used versions that no "
        "replica on the node uses are evicted beyond it.",
    )
    download_streams: int = Field(
        default=8, ge=1, le=64, description="Parallel ranged downloads per file fetched from a remote root."
    )
    download_part_mb: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Size of one ranged download in MiB; files larger than one part are fetched in parallel.",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^@/\s]+(/[^@\s]*)?$",
        description="S3 endpoint for an S3-compatible store (MinIO, Ceph RGW, GCS's XML API, a local "
        "test server); null: AWS, or the AWS_ENDPOINT_URL environment variable.",
    )
    region: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]{1,32}$",
        description="S3 region; null: the AWS environment's (AWS_REGION / AWS_DEFAULT_REGION).",
    )
    connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Seconds to wait for a connection to the object store before an attempt fails.",
    )
    read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds to wait for the object store's next bytes before an attempt fails.",
    )
    max_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Attempts per object-store request, the first included (botocore's retries, and "
        "s3fs's around reading a body). An unreachable store is reported (StorageUnavailable: loaded "
        "adapters keep serving) after about max_attempts x connect_timeout_s at most.",
    )
    request_checksum_calculation: Literal["when_supported", "when_required"] = Field(
        default="when_supported",
        description="botocore's request checksums: when_supported sends a CRC32 of every upload (AWS "
        "S3 checks it); when_required only where the API demands one, for S3-compatible stores that "
        "refuse the x-amz-checksum headers (the probe write names such an error).",
    )
    single_writer: bool = Field(
        default=False,
        description="Allow an object store that does not honour conditional writes (If-Match / "
        "If-None-Match), found by a probe write when a writer starts: only safe when one process at a "
        "time writes CURRENT pointers and state (one merge job, one promotion controller).",
    )

    @model_validator(mode="after")
    def _no_secrets_and_s3_only_fields(self) -> Self:
        scheme, sep, rest = self.url.partition("://")
        if sep and "@" in rest.split("/", 1)[0]:
            raise ValueError(
                f"storage.url must not hold credentials (got {scheme}://...@...): object-store "
                "credentials come from the environment or a Kubernetes Secret, never from config files"
            )
        if not self.is_s3:
            for field in ("endpoint_url", "region"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"storage.{field} applies to s3:// URLs only; got storage.url {self.url!r}"
                    )
        return self

    @property
    def is_s3(self) -> bool:
        return self.url.startswith(S3_SCHEMES)

    @property
    def cache_max_bytes(self) -> int:
        return int(self.cache_max_gb * 1e9)


class RouterConfig(StrictModel):
    adapter: AdapterName | None = Field(
        default="router", description="Name of the routing adapter in storage; null disables routing."
    )
    labels: dict[int, AdapterName] = Field(
        default_factory=dict, description="Router label ids mapped to the adapter names they select."
    )
    prompt: str = Field(
        default="Which screen is this?", description="Prompt given to the routing adapter with the image."
    )
    confidence_threshold: ConfidenceThreshold = 0.5
    below_threshold: BelowThreshold = "reject"


class ScalingConfig(StrictModel):
    """Resources and autoscaling of one Serve deployment."""

    gpu: float = Field(default=0.0, ge=0.0, description="GPUs per replica (0 on the CPU default).")
    cpu: float = Field(default=1.0, ge=0.0, description="CPUs per replica.")
    min_replicas: int = Field(default=0, ge=0, description="Autoscaling floor; 0 allows scale to zero.")
    max_replicas: int = Field(default=1, ge=1, description="Autoscaling ceiling.")
    scaledown_window: float = Field(
        default=300.0, ge=0.0, description="Seconds idle before a replica is removed (downscale delay)."
    )

    @model_validator(mode="after")
    def _replicas(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class BatchingConfig(StrictModel):
    """How a model deployment looks for new versions in storage (batches form per decode step)."""

    refresh_interval_s: float = Field(
        default=5.0, ge=0.0, description="Minimum seconds between storage checks for a new version."
    )


class MergedAdapterConfig(ScalingConfig):
    name: AdapterName = Field(description="Adapter to serve from its merged, published copy.")
    enabled: bool = Field(default=True, description="Whether its merged deployment runs.")


class MergedConfig(BatchingConfig):
    enabled: bool = Field(default=True, description="Serve merged deployments at all.")
    adapters: list[MergedAdapterConfig] = Field(
        default_factory=list, description="Adapters merged into the base weights, one deployment each."
    )


class DynamicConfig(ScalingConfig, BatchingConfig):
    enabled: bool = Field(default=True, description="Run the shared dynamic-LoRA deployment.")
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling floor; 0 allows scale to zero.")
    adapters: DynamicAdapters = Field(default_factory=list)
    max_loaded_adapters: MaxLoadedAdapters = 8
    max_lora_rank: int = Field(
        default=32,
        ge=1,
        le=512,
        description="Largest LoRA rank served: each of the LRU's slots is this wide in every targeted layer "
        "(memory: slots x rank x sum of in+out features); adapters of higher rank are refused at deploy.",
    )


class PromotionConfig(ScalingConfig):
    """Traffic-aware promotion: ``slots`` merged deployments whose adapter a controller picks by traffic.

    The slots are bound when the app is built (Serve cannot add deployments from inside the app), so
    ``slots`` and the scaling fields are static; the thresholds are live (the controller's user_config).
    """

    enabled: PromotionEnabled = False
    slots: int = Field(
        default=0,
        ge=0,
        description="Merged slot deployments bound at build time, each serving at most one promoted adapter.",
    )
    promote_rps: PromoteRps = 2.0
    promote_window_s: PromoteWindowS = 30.0
    demote_rps: DemoteRps = 0.5
    demote_window_s: DemoteWindowS = 120.0
    cooldown_s: CooldownS = 300.0
    deny: DenyAdapters = Field(default_factory=list)
    interval_s: float = Field(default=1.0, gt=0, description="Seconds between the controller's decisions.")
    report_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between each gateway's reports of its per-adapter request counts.",
    )
    drain_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds between routing a demoted adapter back to the dynamic deployment and freeing its "
        "slot, so requests already sent to the slot finish there.",
    )


class GatewayConfig(StrictModel):
    prefer_merged: PreferMerged = True
    fallback_to_dynamic: FallbackToDynamic = True
    request_timeout_s: float = Field(default=60.0, gt=0, description="Per-hop timeout for a request.")


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


#: An environment variable's name.
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: A host name, lower case, or a wildcard for its subdomains (``*.example.com``).
HOST_RE = r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"


class ApiConfig(StrictModel):
    """The OpenAI-compatible API (``/v1``): the model names it lists, image limits, and API keys."""

    base_model_name: str | None = Field(
        default=None,
        min_length=1,
        pattern=r"^\S+$",
        description="Model id under which /v1 lists and accepts the base model without an adapter; "
        "null: base_model.id.",
    )
    routed_model_name: str = Field(
        default="auto",
        min_length=1,
        pattern=r"^\S+$",
        description="Model id that lets the routing adapter choose the expert for each request's last "
        "screenshot (the below_threshold rule applies).",
    )
    max_images: int = Field(
        default=8, ge=1, le=64, description="Most images in one chat request, earlier screenshots included."
    )
    image_url_hosts: list[Annotated[str, Field(pattern=HOST_RE)]] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs the gateway fetches (exact names, or *.example.com for "
        "subdomains; redirects are not followed); empty: only data: URLs are accepted.",
    )
    image_fetch_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Time limit for fetching one image URL from an allowed host (size: limits.max_image_bytes).",
    )
    key_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_RE,
        description="Environment variable holding an API key. With key_env or key_file set, /v1/*, /infer, "
        "/adapters and /stats need `Authorization: Bearer <key>` (401 otherwise); null with key_file null: "
        "no keys.",
    )
    key_file: str | None = Field(
        default=None,
        min_length=1,
        description="File holding API keys, one per line ('#' comments and blank lines skipped), e.g. a "
        "mounted Kubernetes Secret; re-read when it changes, so keys rotate without a restart.",
    )

    @property
    def keys_required(self) -> bool:
        """Whether a key source is configured (requests then need a key)."""
        return self.key_env is not None or self.key_file is not None


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
    step: Literal["auto", "eager", "static", "compile", "cuda_graphs"] = Field(
        default="auto",
        description="How a decode step (every row decoding one token) runs. eager: the variable-shape step. "
        "static: padded to a batch-size bucket (1, 2, 4, 8, 16, 32), with no branch on data and no host sync "
        "inside, run eagerly. compile: that step through torch.compile (inductor; compiled per bucket on first "
        "use). cuda_graphs: that step captured as a CUDA graph per bucket on first use and replayed (CUDA "
        "only). auto: cuda_graphs on CUDA, eager on the CPU (measured faster there: python -m benchmarks).",
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


class DeploymentConfig(StrictModel):
    version: int = Field(default=1, ge=1, le=1, description="Schema version of this file.")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="The base VLM.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Shared storage.")
    system_prompt: str = Field(default=DEFAULT_SYSTEM_PROMPT, description="System prompt for experts.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Routing adapter settings.")
    merged: MergedConfig = Field(default_factory=MergedConfig, description="Merged deployments.")
    dynamic: DynamicConfig = Field(default_factory=DynamicConfig, description="Dynamic-LoRA deployment.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Routing between the two.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    merge: MergeJobConfig = Field(default_factory=MergeJobConfig, description="Merge job settings.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="KV cache memory and step scheduling of every model replica.",
    )
    api: ApiConfig = Field(default_factory=ApiConfig, description="The OpenAI-compatible API (/v1).")
    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig,
        description="Traffic-aware promotion of hot dynamic adapters into merged slots (off by default).",
    )
    outputs: dict[AdapterName, OutputGrammar] = Field(
        default_factory=dict,
        description="Each expert's answer grammar (regex, json_schema or choice), applied to its answers "
        "unless a request brings its own; experts not named answer free text.",
    )

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> Self:
        merged = [a.name for a in self.merged.adapters]
        for field, names in (
            ("merged.adapters", merged),
            ("dynamic.adapters", self.dynamic.adapters),
            ("promotion.deny", self.promotion.deny),
        ):
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    raise ValueError(f"{field}: duplicate adapter name {n!r}")
                seen.add(n)
        both = sorted(set(merged) & set(self.dynamic.adapters))
        if both:
            raise ValueError(
                f"adapters {both} are listed in both merged.adapters and dynamic.adapters; list each once "
                "(merged adapters are served dynamically as a fallback anyway)"
            )
        if self.router.adapter is not None and self.router.adapter in self.all_adapters:
            raise ValueError(
                f"router.adapter {self.router.adapter!r} is also listed as an expert; give it its own name"
            )
        unknown = {k: v for k, v in self.router.labels.items() if v not in self.all_adapters}
        live_elsewhere = bool(info.context and info.context.get("live_fields_external"))
        if unknown and not live_elsewhere:
            raise ValueError(
                f"router.labels {unknown} name no adapter in merged.adapters or dynamic.adapters "
                f"(known: {sorted(self.all_adapters)})"
            )
        stray = sorted(set(self.outputs) - set(self.all_adapters))
        if stray and not live_elsewhere:
            raise ValueError(
                f"outputs names {stray}, no adapter of merged.adapters or dynamic.adapters "
                f"(known: {sorted(self.all_adapters)})"
            )
        targets = list(self.router.labels.values())
        dup_targets = sorted({v for v in targets if targets.count(v) > 1})
        if dup_targets:
            raise ValueError(f"router.labels maps several labels to {dup_targets}")
        return self

    @model_validator(mode="after")
    def _promotion(self) -> Self:
        """Promotion needs somewhere to promote to, and the dynamic deployment to demote back to."""
        p = self.promotion
        _check_rates(p.demote_rps, p.promote_rps, prefix="promotion.")
        if p.enabled and p.slots < 1:
            raise ValueError(
                f"promotion.enabled needs promotion.slots >= 1, got {p.slots}: promoted adapters are served "
                "by the slot deployments"
            )
        if p.enabled and not self.dynamic.enabled:
            raise ValueError(
                "promotion.enabled needs dynamic.enabled: adapters are promoted from, and demoted back to, "
                "the dynamic deployment"
            )
        return self

    @model_validator(mode="after")
    def _api_names(self) -> Self:
        """The /v1 model names must not shadow each other or an expert adapter."""
        base, routed = self.api_base_model_name, self.api.routed_model_name
        if routed == base:
            raise ValueError(
                f"api.routed_model_name {routed!r} is also the base model's name; give it another name"
            )
        for field, name in (("api.routed_model_name", routed), ("api.base_model_name", base)):
            if name in self.all_adapters:
                raise ValueError(f"{field} {name!r} is also an expert adapter's name; rename one")
        return self

    @property
    def api_base_model_name(self) -> str:
        """The base model's id in the OpenAI-compatible API."""
        return self.api.base_model_name or self.base_model.id

    def static_dump(self) -> dict[str, object]:
        """The config without its live fields: the app's args (live fields travel as user_config)."""
        data = self.model_dump(mode="json")
        for section, key in LIVE_FIELDS:
            data[section].pop(key)
        if not data[
            "outputs"
        ]:  # left out when empty, as in a config file (generated files stay as they were)
            del data["outputs"]
        return data

    @classmethod
    def from_static(cls, data: dict[str, object]) -> tuple[DeploymentConfig, LiveSettings | None]:
        """Validate the app's args: a :meth:`static_dump` (no live field), or a whole config (every one).

        Returns the config and, for a whole config, its live settings. For a static dump the returned
        config's live fields hold placeholders: live values reach a deployment only as its user_config.
        A mapping with some live fields but not all is refused naming the missing ones; a section absent
        altogether counts as one holding its defaults.
        """
        present = [(s, k) for s, k in LIVE_FIELDS if k in _section(data, s)]
        # a section left out altogether takes its defaults, as in a config file (configs from before a
        # section existed, such as promotion, stay valid); one that is there must hold all its live fields
        missing = [f"{s}.{k}" for s, k in LIVE_FIELDS if (s, k) not in present and s in data]
        if present and missing:
            raise ConfigError(
                f"app args: the config holds some live fields but not {missing}: pass a whole config, or "
                "none of them (the generated Serve config carries them as user_config)"
            )
        try:
            cfg = cls.model_validate(data, context={"live_fields_external": not present})
        except ValidationError as e:
            raise ConfigError(f"app args: {_describe(e)}") from e
        return cfg, LiveSettings.of(cfg) if present else None

    @property
    def engine_settings(self) -> EngineSettings:
        """What an engine needs of this config."""
        return EngineSettings(
            base_model=self.base_model,
            system_prompt=self.system_prompt,
            max_new_tokens=self.limits.max_new_tokens,
            min_pixels=self.limits.min_pixels,
            max_pixels=self.limits.max_pixels,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            max_completion_tokens=self.limits.max_completion_tokens,
            kv=self.engine,
        )

    @property
    def all_adapters(self) -> list[str]:
        """Expert adapters, merged first, in config order."""
        return [a.name for a in self.merged.adapters] + list(self.dynamic.adapters)

    @property
    def merged_enabled(self) -> list[MergedAdapterConfig]:
        return [a for a in self.merged.adapters if a.enabled] if self.merged.enabled else []


class EngineSettings(StrictModel):
    """What an engine needs: the model, the prompt around each request, generation limits."""

    base_model: BaseModelConfig = Field(description="The base VLM.")
    system_prompt: str = Field(description="System prompt put before each request.")
    max_new_tokens: int = Field(ge=1, description="Tokens generated per request, at most.")
    min_pixels: int = Field(ge=1, description="Fewest pixels the model sees of an image.")
    max_pixels: int = Field(ge=1, description="Most pixels the model sees of an image.")
    max_prompt_tokens: int = Field(ge=1, description="Longest prompt in tokens, image tokens included.")
    max_completion_tokens: int = Field(default=512, ge=1, description="Most tokens a request may ask for.")
    kv: EngineConfig = Field(default_factory=EngineConfig, description="KV cache and step scheduling.")

    @property
    def bounds(self) -> PixelBounds:
        return PixelBounds(self.min_pixels, self.max_pixels)

    @property
    def image_factor(self) -> int:
        """Side of one image token in pixels: the patch size times the spatial merge (2)."""
        return self.base_model.image_patch_size * 2


class LiveModel(StrictModel):
    """A deployment's live settings: its Serve user_config, which `serve deploy` changes in place.

    Every field is required: a user_config missing one is refused naming it, never defaulted.
    """

    #: field -> (section, key) of :class:`DeploymentConfig` it comes from
    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {}

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> Self:
        return cls.model_validate({f: getattr(getattr(cfg, s), k) for f, (s, k) in cls.SOURCE.items()})

    @classmethod
    def from_user_config(cls, data: object, deployment: str) -> Self:
        """Validate a user_config; raise :class:`ConfigError` naming the deployment, field and value."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{deployment} user_config: {_describe(e)}") from e


class GatewayLive(LiveModel):
    """The gateway's live settings."""

    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {
        "prefer_merged": ("gateway", "prefer_merged"),
        "fallback_to_dynamic": ("gateway", "fallback_to_dynamic"),
        "confidence_threshold": ("router", "confidence_threshold"),
        "below_threshold": ("router", "below_threshold"),
        "dynamic_adapters": ("dynamic", "adapters"),
    }
    prefer_merged: PreferMerged
    fallback_to_dynamic: FallbackToDynamic
    confidence_threshold: ConfidenceThreshold
    below_threshold: BelowThreshold
    dynamic_adapters: DynamicAdapters


class DynamicLive(LiveModel):
    """The dynamic deployment's live settings."""

    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {
        "adapters": ("dynamic", "adapters"),
        "max_loaded_adapters": ("dynamic", "max_loaded_adapters"),
    }
    adapters: DynamicAdapters
    max_loaded_adapters: MaxLoadedAdapters


class PromotionLive(LiveModel):
    """The promotion controller's live settings: its thresholds, and the switch that empties every slot."""

    SOURCE: ClassVar[dict[str, tuple[str, str]]] = {
        "enabled": ("promotion", "enabled"),
        "promote_rps": ("promotion", "promote_rps"),
        "promote_window_s": ("promotion", "promote_window_s"),
        "demote_rps": ("promotion", "demote_rps"),
        "demote_window_s": ("promotion", "demote_window_s"),
        "cooldown_s": ("promotion", "cooldown_s"),
        "deny": ("promotion", "deny"),
    }
    enabled: PromotionEnabled
    promote_rps: PromoteRps
    promote_window_s: PromoteWindowS
    demote_rps: DemoteRps
    demote_window_s: DemoteWindowS
    cooldown_s: CooldownS
    deny: DenyAdapters

    @model_validator(mode="after")
    def _rates(self) -> Self:
        _check_rates(self.demote_rps, self.promote_rps, prefix="")
        return self

    @classmethod
    def default(cls) -> PromotionLive:
        """The live fields of a config without a promotion section: promotion off."""
        section = PromotionConfig()
        return cls.model_validate({f: getattr(section, k) for f, (_, k) in cls.SOURCE.items()})


def _check_rates(demote_rps: float, promote_rps: float, prefix: str) -> None:
    """Hysteresis: with demote_rps >= promote_rps one steady rate would both promote and demote."""
    if demote_rps >= promote_rps:
        raise ValueError(
            f"{prefix}demote_rps ({demote_rps}) must be below {prefix}promote_rps ({promote_rps}), or an "
            "adapter at a steady rate would be promoted and demoted in turn"
        )


class LiveSettings(StrictModel):
    """Every deployment's live settings, derived from one config."""

    gateway: GatewayLive = Field(description="The gateway's user_config.")
    dynamic: DynamicLive = Field(description="The dynamic deployment's user_config.")
    promotion: PromotionLive = Field(
        default_factory=PromotionLive.default,
        description="The promotion controller's user_config; left out: promotion off.",
    )

    @classmethod
    def of(cls, cfg: DeploymentConfig) -> LiveSettings:
        return cls(gateway=GatewayLive.of(cfg), dynamic=DynamicLive.of(cfg), promotion=PromotionLive.of(cfg))


#: Config fields `serve deploy` changes in place (Serve user_config), never part of the app's args.
LIVE_FIELDS: tuple[tuple[str, str], ...] = tuple(
    sorted({src for m in (GatewayLive, DynamicLive, PromotionLive) for src in m.SOURCE.values()})
)
