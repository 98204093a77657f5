"""What the file schema and the runtime models are built from: :class:`StrictModel`, the config's
error, adapter names, and :class:`LiveFields`, the mark of the live fields."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Annotated, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ADAPTER_NAME_RE",
    "AdapterName",
    "ConfigError",
    "LiveFields",
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


class LiveFields(StrictModel):
    """A section's live fields: the ones `serve deploy` changes in place (Serve user_config).

    The mark of a live field is where it is declared: in a subclass of this one that names its
    ``SECTION`` of the file, and that the section's model inherits. Type, constraints, default and
    description are declared there, once; the live models (:mod:`moe_core.config.runtime`) inherit the
    same classes, and :data:`~moe_core.config.LIVE_FIELDS` lists them.
    """

    #: The :class:`~moe_core.config.DeploymentConfig` section whose live fields these are.
    SECTION: ClassVar[str]

    @classmethod
    def declared(cls) -> list[tuple[type[LiveFields], str]]:
        """(fragment, field) for each live field of this model, by the fragment that declares it."""
        return [
            (base, name)
            for base in reversed(cls.__mro__)
            if isinstance(base, type) and issubclass(base, LiveFields) and "SECTION" in vars(base)
            for name in inspect.get_annotations(base)
            if name in cls.model_fields
        ]


def describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        if err["loc"]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        else:  # a cross-field rule: its message names the fields and values itself
            parts.append(str(err["msg"]).removeprefix("Value error, "))
    return "; ".join(parts)
