"""Outlier-aware QuantEase: ``W ~ Q + S`` with ``Q`` on an integer grid and ``S`` a few full-precision weights per row.

Paper: Behdin et al. (arXiv 2309.01885), outlier-aware variant (linkedin/QuantEase ``quantease_outlier.py``):
minimize ``f(Q, S) = tr((W - Q - S) H (W - Q - S)^T)`` with ``S`` k-sparse, alternating a coordinate-descent pass on
``Q`` (target ``W - S``, :func:`.quantease.cd_passes`) with an update of ``S``. The objective separates over rows, so
the budget is ``k = round(fraction * in)`` per row (the ``SparseOutliers`` layout).

Our ``S`` step (monotone by construction): with ``E = W - Q`` and ``R = (E - S) H``, score each entry by the gain of
freeing it alone, ``v_j^2 H_jj`` with ``v = S + R / diag(H)``; take the top-k per row as the support ``T``; refit the
values exactly, ``s_T = (E H)_T H_TT^{-1}`` (a batched k x k solve per row); round to the stored dtype; accept only if
``f`` decreases. The reference uses one IHT gradient step instead; the exact refit is cheaper to converge.

Start (SpQR-like): a support ``T0`` of the largest ``|W|`` per row; the grid is the min-max grid of ``W`` with ``T0``
masked out (narrower groups, the main gain of outliers); ``Q`` comes from the GPTQ loop on that static grid in
act-order with the ``T0`` entries kept unquantized (zero error, so nothing is spread from them).
Grids: ``grid="imatrix"`` (the method's default, like GPTQ and QuantEase) clips each group's range to minimize the
``diag(H)``-weighted error of the masked weights; ``"minmax"`` is the reference's grid.
Guarantee: plain QuantEase (same ``iters`` and grid) is also run; if it ends lower, ``S`` is fitted on top of it with the same
monotone steps. So the result is never worse than QuantEase without outliers on the same ``H``.
Stored: ``SumWeight(IntGroupWeight, SparseOutliersWeight)``, format ``Sum(IntGroup, SparseOutliers)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, IntGroupWeight, fit_scale_zero
from ..formats.outliers import SparseOutliers, encode_outliers
from ..formats.sum import Sum, SumWeight
from ..stats import LayerStats, Stat
from .base import Method
from .gptq import GroupProjector
from .obs import act_order as act_order_perm
from .obs import check_hessian, obs_solve
from .quantease import Grid, cd_passes, quantease_quantize


def _objective(e: torch.Tensor, h: torch.Tensor) -> float:
    return float(((e @ h) * e).sum(dtype=torch.float64))


def s_step(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, h: torch.Tensor, k: int,
           fmt: SparseOutliers) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Proposed ``(S, support [out, k])`` for fixed ``Q`` (see module note); ``None`` if it does not lower ``f``."""
    hd = h.diagonal()
    e = w - q
    g = e @ h
    r = g - s @ h
    v = s + r / hd.clamp(min=1e-30)
    score = torch.where(hd > 0, v * v * hd, torch.full_like(v, -1.0))
    t = torch.topk(score, k, dim=1).indices
    htt = h[t.unsqueeze(-1), t.unsqueeze(-2)]  # [out, k, k]
    ridge = 1e-8 * float(hd.mean()) * torch.eye(k, dtype=h.dtype, device=h.device)
    vals = torch.linalg.solve(htt + ridge, g.gather(1, t).unsqueeze(-1)).squeeze(-1)
    vals = vals.to(fmt.torch_value_dtype).float()
    vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
    s_new = torch.zeros_like(s).scatter_(1, t, vals)
    if _objective(e - s_new, h) < _objective(e - s, h):
        return s_new, t
    return None


def _alternate(w, h, grid: Grid, codes, s, t, k, ofmt, iters: int, trace: list[float]):
    """Alternate S steps and single CD passes on Q for ``iters`` rounds; returns (codes, S, support)."""
    for _ in range(iters):
        q = _decode(grid, codes)
        step = s_step(w, q, s, h, k, ofmt)
        if step is not None:
            s, t = step
        codes, tr = cd_passes(w - s, h, grid, codes, iters=1)
        trace.append(tr[-1])
        if len(trace) > 2 and trace[-2] - trace[-1] <= 1e-5 * abs(trace[-2]) and step is None:
            break
    return codes, s, t


def _decode(grid: Grid, codes: torch.Tensor) -> torch.Tensor:
    q = (codes - grid.zero) * grid.scale  # stored order
    if grid.perm is None:
        return q
    out = torch.empty_like(q)
    out[:, grid.perm] = q
    return out


def quantease_outliers_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: IntGroup, ofmt: SparseOutliers, *,
                                iters: int = 20, outlier_iters: int = 10, damp: float = 0.01,
                                grid: str = "minmax", layer: str = "<layer>") -> tuple[SumWeight, list[float]]:
    """Returns the ``Sum`` weight and the objective trace of the returned candidate."""
    check_hessian(hessian, w.shape[1], layer)
    if fmt.act_order:
        raise ConfigError("quantease-outliers uses static groups in natural order; drop ':act' from the format")
    out, inp = w.shape
    k = ofmt.per_row(inp)
    w = w.float()
    h = hessian.float()
    plain, plain_trace = quantease_quantize(w, h, fmt, iters=iters, damp=damp, grid=grid, layer=layer)
    if k == 0:
        return _pack(fmt, ofmt, plain, torch.zeros(out, 0, dtype=torch.long), torch.zeros_like(w)), plain_trace
    order = act_order_perm(h)
    # Candidate with an outlier-aware grid.
    dead = h.diagonal() == 0
    wz = w.clone()
    wz[:, dead] = 0
    t0 = torch.topk(wz.abs(), k, dim=1).indices
    keep = torch.zeros(out, inp, dtype=torch.bool).scatter_(1, t0, True)
    g = fmt.group(inp)
    masked = torch.where(keep, torch.zeros_like(wz), wz).reshape(out, inp // g, g)
    if grid == "imatrix":  # clipped grids minimizing the diag(H)-weighted error, as the methods without outliers use
        from .rtn_imatrix import weighted_grid

        imp = h.diagonal().clamp(min=0)
        imp = imp + 1e-6 * float(imp.mean()) + 1e-30
        grids = weighted_grid(masked, imp.reshape(inp // g, g), fmt)
    else:
        grids = fit_scale_zero(masked, fmt)
    proj = GroupProjector(fmt, out, inp, order=order, static=grids, device=w.device, keep=keep[:, order].T.contiguous())
    res = obs_solve(w, h, proj, damp=damp, order=order, layer=layer, sync=math.gcd(16, g))
    inv = torch.empty_like(order)
    inv[order] = torch.arange(inp)
    codes = proj.codes[:, inv].float()
    grid = Grid(scale=grids[0].repeat_interleave(g, 1), zero=grids[1].repeat_interleave(g, 1), maxq=fmt.maxq, perm=None)
    s = ((res.q - _decode(grid, codes)) * keep).to(ofmt.torch_value_dtype).float()
    trace = [_objective(w - _decode(grid, codes) - s, h)]
    codes, tr = cd_passes(w - s, h, grid, codes, iters=iters, tol=1e-4, order=order)
    trace += tr[1:]
    codes, s, t = _alternate(w, h, grid, codes, s, t0, k, ofmt, outlier_iters, trace)
    if trace[-1] <= plain_trace[-1]:
        base = IntGroupWeight.from_codes(fmt, codes.to(torch.int64), grids[0], grids[1])
        return _pack(fmt, ofmt, base, t, s), trace
    # Plain QuantEase ended lower: fit S on top of it (monotone from its objective).
    pgrid, pcodes = Grid.of(plain)
    trace = list(plain_trace)
    s = torch.zeros_like(w)
    t = torch.topk(torch.rand(out, inp, generator=torch.Generator().manual_seed(0)), k, dim=1).indices
    pcodes, s, t = _alternate(w, h, pgrid, pcodes, s, t, k, ofmt, outlier_iters, trace)
    _, scale, zero = plain.unpacked()
    base = IntGroupWeight.from_codes(fmt, pcodes.to(torch.int64), scale, zero, pgrid.perm)
    return _pack(fmt, ofmt, base, t, s), trace


def _pack(fmt: IntGroup, ofmt: SparseOutliers, base: IntGroupWeight, t: torch.Tensor, s: torch.Tensor) -> SumWeight:
    extra = encode_outliers(ofmt, s, t)
    sw = SumWeight(format=Sum(base=fmt, extra=ofmt), shape=base.shape, base=base, extra=extra)
    sw.validate()
    return sw


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantEaseOutliers(Method):
    """``QuantEaseOutliers(format=IntGroup(bits=3, group_size=64), outlier_fraction=0.01)``; or give the format as
    ``Sum(IntGroup, SparseOutliers)`` (``int3:g64+outliers:0.01``), whose fraction then wins."""

    name: ClassVar[str] = "quantease-outliers"
    requires: ClassVar[frozenset[Stat]] = frozenset({Stat.GRAM})
    format_types: ClassVar[tuple[type, ...]] = (IntGroup, Sum)

    outlier_fraction: float = 0.01
    iters: int = 20
    outlier_iters: int = 10
    damp: float = 0.01
    grid: str = "imatrix"  # as GPTQ / QuantEase: clipped diag(H)-weighted grids ("minmax": the reference's)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid not in ("minmax", "imatrix"):
            raise ConfigError(f"QuantEaseOutliers.grid must be 'minmax' or 'imatrix', got {self.grid!r}")
        base, _ = self.parts()  # validates
        if base.act_order:
            raise ConfigError("quantease-outliers uses static groups in natural order; drop ':act' from the format")
        if not isinstance(self.iters, int) or self.iters < 0 or not isinstance(self.outlier_iters, int) or self.outlier_iters < 0:
            raise ConfigError("QuantEaseOutliers.iters and outlier_iters must be non-negative integers")

    def parts(self) -> tuple[IntGroup, SparseOutliers]:
        f = self.format
        if isinstance(f, Sum):
            if not isinstance(f.base, IntGroup) or not isinstance(f.extra, SparseOutliers):
                raise ConfigError(f"quantease-outliers needs int...+outliers:..., got {f.spec()}")
            return f.base, f.extra
        return f, SparseOutliers(fraction=self.outlier_fraction)

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        base, extra = self.parts()
        Sum(base=base, extra=extra).check(tuple(w.shape), layer)
        cw, _ = quantease_outliers_quantize(w, stats.hessian(self.name, layer), base, extra, iters=self.iters,
                                            outlier_iters=self.outlier_iters, damp=self.damp, grid=self.grid,
                                            layer=layer)
        return cw
