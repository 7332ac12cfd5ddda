"""HQQ-style half-quadratic optimization of the group grid (calibration-free).

After Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (mobiusml/hqq,
``optimize_weights_proximal``). Per group, minimize ``||W - (Q - z) s||_p^p`` (``p = 0.7``, robust to outliers) over
the zero point by half-quadratic splitting with an auxiliary error ``W_e``:
  ``Q = clamp(round(W / s + z))``,  ``W_e = shrink_p(W - (Q - z) s, beta)``  (generalized soft threshold
  ``sign(x) relu(|x| - |x|^(p-1) / beta)``),  ``z = mean(Q - (W - W_e) / s)``,  ``beta *= kappa``.
Defaults as HQQ: ``p=0.7, beta=10, kappa=1.01, iters=20``. The min-max grid is the start.

Differences from HQQ (the format stores integer zero points, ``IntGroup``): the zero is continuous during the
iterations and rounded at the end; each group keeps the best grid seen (lowest mean ``|W - W_hat|`` after rounding
the zero and the fp16 scale), so the result is never worse than the min-max start in that measure. With
``update_scale`` (always on for symmetric formats, whose zero is fixed) the scale is also refit by least squares
of ``W - W_e`` on ``Q - z`` each iteration.
Stored: an ``IntGroupWeight`` (no act-order: HQQ sees no activations).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, IntGroupWeight, dequantize, fit_scale_zero, quantize_codes, store_scale
from ..stats import LayerStats
from .base import Method


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(p - 1) / beta)


def _finalize(scale: torch.Tensor, zero: torch.Tensor, fmt: IntGroup) -> tuple[torch.Tensor, torch.Tensor]:
    s = store_scale(scale.abs(), fmt)
    z = zero if fmt.symmetric else torch.round(zero).clamp(0, fmt.maxq)
    return s, z


def hqq_grid(groups: torch.Tensor, fmt: IntGroup, *, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
             iters: int = 20, update_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimized ``(scale, zero)`` for ``groups [..., g]`` (stored-dtype scale, integer zero), as ``fit_scale_zero``."""
    w = groups.float()
    s, z = fit_scale_zero(w, fmt)
    maxq = fmt.maxq
    update_scale = update_scale or fmt.symmetric

    def err(s_: torch.Tensor, z_: torch.Tensor) -> torch.Tensor:
        wh = dequantize(quantize_codes(w, s_, z_, maxq), s_, z_)
        return (w - wh).abs().mean(-1)

    best_s, best_z = s.clone(), z.clone()
    best_e = err(s, z)
    s_c, z_c = s.clone(), z.clone()
    for _ in range(iters):
        q = torch.clamp(torch.round(w / s_c.unsqueeze(-1) + z_c.unsqueeze(-1)), 0, maxq)
        we = _shrink(w - (q - z_c.unsqueeze(-1)) * s_c.unsqueeze(-1), beta, p)
        target = w - we
        if update_scale:
            qz = q - z_c.unsqueeze(-1)
            den = (qz * qz).sum(-1)
            s_new = (target * qz).sum(-1) / den.clamp(min=1e-20)
            s_c = torch.where((den > 0) & (s_new > 0), s_new, s_c)
        if not fmt.symmetric:
            z_c = (q - target / s_c.unsqueeze(-1)).mean(-1).clamp(0, maxq)
        beta *= kappa
        s_r, z_r = _finalize(s_c, z_c, fmt)
        e = err(s_r, z_r)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s_r, best_s)
        best_z = torch.where(better, z_r, best_z)
    return best_s, best_z


def hqq_quantize(w: torch.Tensor, fmt: IntGroup, **opts) -> IntGroupWeight:
    out, inp = w.shape
    g = fmt.group(inp)
    groups = w.float().reshape(out, inp // g, g)
    scale, zero = hqq_grid(groups, fmt, **opts)
    codes = quantize_codes(groups, scale, zero, fmt.maxq).reshape(out, inp).to(torch.int64)
    return IntGroupWeight.from_codes(fmt, codes, scale, zero)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HQQ(Method):
    """``HQQ(format=IntGroup(bits=4, group_size=64), p=0.7, beta=10, kappa=1.01, iters=20)``; needs no statistics."""

    name: ClassVar[str] = "hqq"
    format_types: ClassVar[tuple[type, ...]] = (IntGroup,)

    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    update_scale: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.p <= 2:
            raise ConfigError(f"HQQ.p must be in (0, 2], got {self.p!r}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"HQQ.iters must be a non-negative integer, got {self.iters!r}")
        if self.format.act_order:
            raise ConfigError("HQQ sees no activations, so it has no act-order; drop ':act' from the format")

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        return hqq_quantize(w, self.format, p=self.p, beta=self.beta, kappa=self.kappa, iters=self.iters,
                            update_scale=self.update_scale)
