"""Methods: frozen configs whose ``apply`` is a pure function ``(W, statistics) -> compressed weight``.

A method never sees modules, hooks or devices: the runner hands it a dense ``[out, in]`` float32 weight and the
finalized :class:`~tensorslim.stats.LayerStats` it declared in ``requires``; it returns a
:class:`~tensorslim.formats.CompressedWeight`. The planner may call it many times on the same inputs, so it must
not mutate them and must be deterministic for a fixed ``seed``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..formats.base import CompressedWeight, Format
from ..stats import LayerStats, Stat


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method(ABC):
    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[Stat]] = frozenset()
    format_types: ClassVar[tuple[type[Format], ...]] = ()  # the spec types this method can produce

    format: Format

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.format_types and not isinstance(self.format, self.format_types):
            allowed = ", ".join(t.__name__ for t in self.format_types)
            raise ConfigError(f"method {self.name!r} cannot produce {self.format.spec()}; it supports {allowed}")

    @abstractmethod
    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        """Compress one dense ``[out, in]`` weight."""

    def describe(self) -> str:
        return f"{self.name} {self.format.spec()}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Format) else v
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Compensator(ABC):
    """A second stage run after any method: ``(W, compressed, stats) -> compressed'`` (e.g. EoRA adds a low-rank sum)."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[Stat]] = frozenset()

    @abstractmethod
    def apply(self, w: torch.Tensor, compressed: CompressedWeight, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        ...

    def describe(self) -> str:
        return self.name
