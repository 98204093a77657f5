"""What the file schema and the runtime models are built from: :class:`StrictModel`, the config's
error, adapter names, and the types of the live fields (declared once, shared by the config sections
and the live models)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ADAPTER_NAME_RE",
    "AdapterName",
    "BelowThreshold",
    "ConfidenceThreshold",
    "ConfigError",
    "CooldownS",
    "DemoteRps",
    "DemoteWindowS",
    "DenyAdapters",
    "DynamicAdapters",
    "FallbackToDynamic",
    "MaxLoadedAdapters",
    "PreferMerged",
    "PromoteRps",
    "PromoteWindowS",
    "PromotionEnabled",
    "StrictModel",
    "describe",
    "validate_adapter_name",
]

#: Adapter names double as storage path components and Serve deployment names.
ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


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
            raise ConfigError(f"{source}: {describe(e)}") from e


def describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        if err["loc"]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        else:  # a cross-field rule: its message names the fields and values itself
            parts.append(str(err["msg"]).removeprefix("Value error, "))
    return "; ".join(parts)
