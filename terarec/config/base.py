"""The config machinery every section uses: the error type, string enums, checks."""

from __future__ import annotations

import enum


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


class StrEnum(str, enum.Enum):
    """Enum spelled as a lower-case string in YAML."""

    @classmethod
    def from_str(cls, value: str) -> StrEnum:
        try:
            return cls(value.lower())
        except (ValueError, AttributeError):
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"must be one of [{allowed}], got {value!r}") from None


def check(cond: bool, msg: str) -> None:
    """Raises ``ValueError(msg)`` unless ``cond`` (the loader adds file and key)."""
    if not cond:
        raise ValueError(msg)
