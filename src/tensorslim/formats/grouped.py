"""What every format with an optional ``group_size`` along ``in_features`` shares (``None`` = one group per row).

The group checks and the "does not divide" message live here once; a format mixes in :class:`Grouped` and calls
:func:`check_group_size` in its ``__post_init__``.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Shape


def group_reason(inp: int, group: int | None, spec: str) -> str | None:
    """The shared 'group does not divide' message of the grid formats (``None`` when it divides)."""
    if group is not None and inp % group:
        fits = [g for g in (128, 64, 32, 16) if inp % g == 0]
        fix = f"use {spec.split(':')[0]} with group {fits[0]}" if fits else "use per-channel"
        return f"{inp} is not divisible by the block size {group}; {fix}, or ignore the layer"
    return None


def check_group_size(owner: str, value: object, none_means: str = "per-channel") -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{owner}.group_size must be a positive integer or None ({none_means}), got {value!r}")


class Grouped:
    """Mixin for frozen format specs with a ``group_size: int | None`` field."""

    group_size: int | None

    def group(self, inp: int) -> int:
        return inp if self.group_size is None else self.group_size

    def n_groups(self, inp: int) -> int:
        return inp // self.group(inp)

    def supports(self, shape: Shape) -> str | None:
        return group_reason(shape[1], self.group_size, self.spec())  # type: ignore[attr-defined]
