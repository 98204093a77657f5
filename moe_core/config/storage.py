"""The config's ``storage`` section: a local path or an object store, and how the store is reached."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from moe_core.config.base import StrictModel

__all__ = ["S3_SCHEMES", "StorageConfig"]

# Every setting is declared as Field(default, bounds, description=...) (STYLE.md 3), so the models' field
# blocks share a shape, here and across moe_core/config/: each declares other settings, none is a duplicate.

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
    # same shape as ApiConfig's fields (sections.py), different settings: not a duplicate
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
