"""Importance-weighted RTN ("imatrix"): per group, the clipped grid that minimizes the activation-weighted error.

The idea of llama.cpp's importance matrix (``quantize --imatrix``, ``make_qx_quants``): weight each input column by
its mean squared activation ``a_j = diag(X^T X)_j / N`` and choose each group's grid to minimize
``sum_j a_j (w_j - w_hat_j)^2`` (the diagonal part of the layer objective) instead of taking the min-max grid.
Search (vectorized over all groups): the min-max range ``[lo, hi]`` shrunk by each factor in ``shrinks`` (1.0 down to
``min_shrink``), scale rounded to the stored dtype and the integer zero refit for each candidate; then one weighted
least-squares refit of the scale for the chosen codes, kept only if it lowers the error. Columns with zero importance
get a floor of ``1e-6 * mean(a)`` so a group with all-dead inputs still gets a sensible grid.

Statistic: ``NORMS`` (or the diagonal of ``GRAM``). Stored: an ``IntGroupWeight``; never worse than RTN in the
weighted measure (the min-max grid, factor 1.0, is a candidate).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, IntGroupWeight, dequantize, quantize_codes, store_scale
from ..stats import LayerStats, Stat
from .base import Method


def _grid_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt: IntGroup) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        s = store_scale(amax / (fmt.maxq / 2), fmt)
        return s, torch.full_like(s, float(1 << (fmt.bits - 1)))
    flat = hi == lo
    lo = torch.where(flat, -torch.ones_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    s = store_scale((hi - lo) / fmt.maxq, fmt)
    return s, torch.round(-lo / s).clamp(0, fmt.maxq)


def weighted_grid(groups: torch.Tensor, imp: torch.Tensor, fmt: IntGroup, *, n_grid: int = 20,
                  min_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per group of ``groups [out, ng, g]`` minimizing the ``imp [ng, g]``-weighted squared error."""
    w = groups.float()
    lo0 = w.amin(-1).clamp(max=0)
    hi0 = w.amax(-1).clamp(min=0)

    def err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d = w - dequantize(quantize_codes(w, s, z, fmt.maxq), s, z)
        return (d * d * imp).sum(-1)

    best_s, best_z = _grid_from_range(lo0, hi0, fmt)
    best_e = err(best_s, best_z)
    for k in range(1, n_grid):
        f = 1.0 - (1.0 - min_shrink) * k / (n_grid - 1)
        s, z = _grid_from_range(lo0 * f, hi0 * f, fmt)
        e = err(s, z)
        better = e < best_e
        best_e, best_s, best_z = torch.where(better, e, best_e), torch.where(better, s, best_s), torch.where(better, z, best_z)
    # One weighted least-squares refit of the scale for the chosen codes (zero held).
    qz = quantize_codes(w, best_s, best_z, fmt.maxq) - best_z.unsqueeze(-1)
    den = (imp * qz * qz).sum(-1)
    s_ls = (imp * w * qz).sum(-1) / den.clamp(min=1e-30)
    s_ls = store_scale(torch.where((den > 0) & (s_ls > 0), s_ls, best_s), fmt)
    e = err(s_ls, best_z)
    better = e < best_e
    return torch.where(better, s_ls, best_s), best_z


def rtn_imatrix_quantize(w: torch.Tensor, importance: torch.Tensor, fmt: IntGroup, **opts) -> IntGroupWeight:
    out, inp = w.shape
    g = fmt.group(inp)
    imp = importance.float().clamp(min=0)
    imp = imp + 1e-6 * float(imp.mean()) + 1e-30
    groups = w.float().reshape(out, inp // g, g)
    scale, zero = weighted_grid(groups, imp.reshape(inp // g, g), fmt, **opts)
    codes = quantize_codes(groups, scale, zero, fmt.maxq).reshape(out, inp).to(torch.int64)
    return IntGroupWeight.from_codes(fmt, codes, scale, zero)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNImatrix(Method):
    """``RTNImatrix(format=IntGroup(bits=4, group_size=64), n_grid=20, min_shrink=0.5)``."""

    name: ClassVar[str] = "rtn-imatrix"
    requires: ClassVar[frozenset[Stat]] = frozenset({Stat.NORMS})
    format_types: ClassVar[tuple[type, ...]] = (IntGroup,)

    n_grid: int = 20
    min_shrink: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ConfigError(f"RTNImatrix.n_grid must be a positive integer, got {self.n_grid!r}")
        if not 0 < self.min_shrink <= 1:
            raise ConfigError(f"RTNImatrix.min_shrink must be in (0, 1], got {self.min_shrink!r}")
        if self.format.act_order:
            raise ConfigError("rtn-imatrix has no column order to choose; drop ':act' (use gptq for act-order)")

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        imp = stats.channel_norms(self.name, layer) ** 2
        if not torch.isfinite(imp).all():
            from ..errors import CalibrationError

            raise CalibrationError(f"layer {layer!r}: input norms contain NaN/Inf")
        return rtn_imatrix_quantize(w, imp, self.format, n_grid=self.n_grid, min_shrink=self.min_shrink)
