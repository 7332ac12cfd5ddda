"""RTN for every non-integer grid: FP8, MXFP4/MXFP8, NVFP4, NF4, ternary, BCQ (alternating fit), bipolar-INT, k-quants.

Each format module owns its round-to-nearest encoder (the format's scale rule, then the nearest grid point):
``quantize_fp8``, ``quantize_mx``, ``quantize_nvfp4``, ``quantize_nf4``, ``quantize_ternary``, ``quantize_bcq``,
``quantize_bipolar``, ``quantize_kquant`` (llama.cpp Q4_K / Q6_K). ``RTNGrid`` dispatches on the format type; :func:`rtn` is the factory behind the ``rtn`` method
name, so ``build_method("rtn", fmt)`` gives the integer :class:`~tensorslim.methods.rtn.RTN` for ``IntGroup`` and
``RTNGrid`` for the others. Data-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..formats.base import CompressedWeight, Format, check_weight
from ..formats.bcq import BCQ, quantize_bcq
from ..formats.bipolar import Bipolar, quantize_bipolar
from ..formats.fp8 import FP8, quantize_fp8
from ..formats.intgroup import IntGroup
from ..formats.kquant import KQuant, quantize_kquant
from ..formats.mx import MXFP, NVFP4, quantize_mx, quantize_nvfp4
from ..formats.nf4 import NF4, quantize_nf4
from ..formats.ternary import Ternary, quantize_ternary
from ..stats import LayerStats
from .base import Method
from .rtn import RTN

_ENCODERS: dict[type[Format], Callable[[torch.Tensor, Any], CompressedWeight]] = {
    FP8: quantize_fp8,
    MXFP: quantize_mx,
    NVFP4: quantize_nvfp4,
    NF4: quantize_nf4,
    Ternary: quantize_ternary,
    BCQ: quantize_bcq,
    Bipolar: quantize_bipolar,
    KQuant: quantize_kquant,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNGrid(Method):
    name: ClassVar[str] = "rtn"
    format_types: ClassVar[tuple[type, ...]] = tuple(_ENCODERS)

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        return _ENCODERS[type(self.format)](w.float(), self.format)


def rtn(*, format: Format, **options: Any) -> Method:  # noqa: A002 - the field name every method uses
    """Factory for the ``rtn`` method name: integer RTN for ``IntGroup``, :class:`RTNGrid` otherwise."""
    if isinstance(format, IntGroup):
        return RTN(format=format, **options)
    return RTNGrid(format=format, **options)
