"""What every model's frozen config dataclass shares."""

from __future__ import annotations

import dataclasses

from ..errors import FormatError


def config_from_dict(cls, d: dict, arch: str):
    """Build a config dataclass from bundle metadata, naming unknown or bad fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise FormatError(f"config: unknown fields {sorted(unknown)} for {arch}")
    try:
        return cls(**d)
    except TypeError as e:
        raise FormatError(f"config: {e}") from None
