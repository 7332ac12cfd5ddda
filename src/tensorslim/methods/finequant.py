"""FineQuant-style adaptive granularity: per matrix, the coarsest group size whose error stays under a threshold.

Paper: Kim et al., "FineQuant: Unlocking Efficiency with Fine-Grained Weight-Only Quantization for LLMs"
(arXiv 2308.09723): start column-wise (one scale per output row) and refine the block size only where outliers make
the coarse grid fail; int4 with block 64 is their working point. The paper's exact refinement test could not be read
(METHODS.md marks it UNVERIFIED), so the rule here is explicit and data-free:
  candidates ``per-channel, 1024, 512, 256, 128, 64, 32, ...`` down to the format's group size (those dividing ``in``);
  ``err(g) = ||W - RTN_g(W)||_F^2 / ||W||_F^2``; pick the coarsest ``g`` with ``err(g) <= max_ratio * err(g_min)``
  (and, if given, ``err(g) <= max_rel_error``). ``g_min`` (the finest allowed) is the format's group size.
Coarser groups store fewer scales, so the choice trades a bounded error increase for bits per weight.
Stored: an ``IntGroupWeight`` whose format has the chosen group size (so it differs from the method's ``format``,
which names the bits, the finest group and the other grid options).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, IntGroupWeight, quantize_rtn
from ..stats import LayerStats
from .base import Method

log = logging.getLogger(__name__)

_SIZES = (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8)


def candidate_groups(in_features: int, finest: int | None) -> list[int | None]:
    """Coarse to fine: per-channel, then power-of-two sizes dividing ``in`` down to ``finest`` (inclusive)."""
    out: list[int | None] = [None]
    if finest is None:
        return out
    out += [g for g in _SIZES if finest <= g < in_features and in_features % g == 0]
    if finest not in out and in_features % finest == 0:
        out.append(finest)
    return out


def finequant_quantize(w: torch.Tensor, fmt: IntGroup, *, max_ratio: float = 1.25,
                       max_rel_error: float | None = None) -> tuple[IntGroupWeight, dict[str, float]]:
    """Quantize with the coarsest acceptable group; returns the weight and ``{spec: relative error}`` of candidates."""
    norm = float(w.double().pow(2).sum()) or 1.0
    errors: dict[str, float] = {}
    results = []
    for g in candidate_groups(w.shape[1], fmt.group_size):
        f = dataclasses.replace(fmt, group_size=g)
        cw = quantize_rtn(w.float(), f)
        errors[f.spec()] = float((w.double() - cw.decode().double()).pow(2).sum()) / norm
        results.append(cw)
    finest = errors[results[-1].format.spec()]
    for cw in results:
        e = errors[cw.format.spec()]
        if e <= max_ratio * finest and (max_rel_error is None or e <= max_rel_error):
            return cw, errors
    return results[-1], errors


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineQuant(Method):
    """``FineQuant(format=IntGroup(bits=4, group_size=64), max_ratio=1.25)``: ``format.group_size`` is the finest."""

    name: ClassVar[str] = "finequant"
    format_types: ClassVar[tuple[type, ...]] = (IntGroup,)

    max_ratio: float = 1.25
    max_rel_error: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_ratio, (int, float)) or self.max_ratio < 1:
            raise ConfigError(f"FineQuant.max_ratio must be >= 1, got {self.max_ratio!r}")
        if self.max_rel_error is not None and not self.max_rel_error > 0:
            raise ConfigError(f"FineQuant.max_rel_error must be > 0 or None, got {self.max_rel_error!r}")
        if self.format.act_order:
            raise ConfigError("finequant is data-free and has no act-order; drop ':act' from the format")

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        cw, errors = finequant_quantize(w, self.format, max_ratio=self.max_ratio, max_rel_error=self.max_rel_error)
        log.debug("layer %r: finequant chose %s from %s", layer, cw.format.spec(), errors)
        return cw
