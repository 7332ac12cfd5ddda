"""RTN: round-to-nearest on the min-max grid of an integer format. Data-free; the baseline every solver must beat.

Equation: ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` per group (grid in :mod:`tensorslim.formats.intgroup`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, quantize_rtn
from ..stats import LayerStats
from .base import Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(Method):
    name: ClassVar[str] = "rtn"
    format_types: ClassVar[tuple[type, ...]] = (IntGroup,)

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        if self.format.act_order:
            from ..errors import ConfigError

            raise ConfigError("RTN has no column order to choose; act-order (':act') needs a solver such as gptq")
        return quantize_rtn(w.float(), self.format)
