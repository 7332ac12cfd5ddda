"""Plans: an ordered list of rules ``pattern -> method`` resolved into a per-layer table.

Patterns: an exact layer name, ``re:<regex>`` (full match), or a glob (``*``, ``?``; ``*`` alone is the default).
The first matching rule wins; ``None`` keeps a layer dense. Every layer's decision is recorded (never a silent skip),
and shapes are checked against the chosen format before any work starts, so a bad group size fails in a second with
the layer named instead of after calibration.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence

from ..errors import ConfigError
from ..methods.base import Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    pattern: str
    method: Method | None

    def __post_init__(self) -> None:
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise ConfigError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from e

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return name == self.pattern or fnmatch.fnmatchcase(name, self.pattern)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    rules: tuple[Rule, ...]

    @classmethod
    def uniform(cls, method: Method, *, ignore: Sequence[str] = ()) -> "Plan":
        """One method for every block linear except the ``ignore`` patterns (kept dense)."""
        return cls(rules=tuple(Rule(pattern=p, method=None) for p in ignore) + (Rule(pattern="*", method=method),))

    def resolve(self, names: Sequence[str], shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, Method | None]:
        table: dict[str, Method | None] = {}
        for name in names:
            table[name] = next((r.method for r in self.rules if r.matches(name)), None)
        if shapes is not None:
            for name, m in table.items():
                if m is not None:
                    m.format.check(shapes[name], name)
        return table
