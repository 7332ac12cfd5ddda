"""QuantEase: cyclic coordinate descent on the layer objective, on a fixed integer grid.

Paper: Behdin et al., "QuantEase: Optimization-based Quantization for Language Models" (arXiv 2309.01885); reference
linkedin/QuantEase (``method/quantease.py``). Objective ``f(Q) = tr((W - Q) H (W - Q)^T)``. For column ``j`` (all rows
at once, ``f`` separates over rows) the unconstrained minimizer with the other columns fixed is
``u = Q_j + R_j / H_jj`` with ``R = (W - Q) H``; ``f`` restricted to that coordinate is a convex parabola, so the
nearest grid point of ``u`` (clamped to the code range) is the exact coordinate minimizer and ``f`` never increases.
After a column changes by ``d``, ``R -= d H_j``; inside a block of columns this is a rank-1 update of the block's rows,
the rest of ``R`` gets one GEMM per block (as GPTQ's lazy updates). A pass costs ``O(out * in^2)``.

Grid: the scales and zero points of the warm start (GPTQ by default, or RTN) are kept fixed, as the reference does
(recomputing them would break the descent guarantee). Visiting order: act-order (descending ``diag H``) by default,
as the reference. ``trace`` records ``f`` before the first pass and after each pass (float64 sums of float32 terms).
Deviations: no "relaxed" passes (the reference skips rounding on every third pass; that breaks monotonicity), and
passes stop early when a pass improves ``f`` by less than ``tol`` (relative). Dead inputs (``H_jj = 0``) keep their
warm-start value. No damping is needed (no inverse); ``H`` is used as given.

Stored: an ``IntGroupWeight`` in the warm start's layout (with its permutation for ``:act`` formats).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, IntGroupWeight, quantize_rtn
from ..stats import LayerStats, Stat
from .base import Method
from .gptq import gptq_quantize
from .obs import act_order as act_order_perm
from .obs import check_hessian


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
    """A fixed per-column grid in *stored* column order: code = clamp(round(x / scale) + zero, 0, maxq)."""

    scale: torch.Tensor  # [out, in] float32 (group scale expanded to columns)
    zero: torch.Tensor  # [out, in] float32
    maxq: int
    perm: torch.Tensor | None  # stored order = W[:, perm]

    @classmethod
    def of(cls, cw: IntGroupWeight) -> tuple["Grid", torch.Tensor]:
        """The grid of a quantized weight and its codes ``[out, in]`` (float, stored order)."""
        codes, scale, zero = cw.unpacked()
        g = cw.format.group(cw.shape[1])
        perm = None if cw.perm is None else cw.perm.long()
        grid = cls(scale=scale.repeat_interleave(g, 1), zero=zero.repeat_interleave(g, 1), maxq=cw.format.maxq, perm=perm)
        return grid, codes.float()


def cd_passes(target: torch.Tensor, hessian: torch.Tensor, grid: Grid, codes: torch.Tensor, *, iters: int,
              tol: float = 0.0, order: torch.Tensor | None = None, block_size: int = 128,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[float]]:
    """Run up to ``iters`` coordinate-descent passes from ``codes`` (stored order) towards ``target`` (natural order).

    Returns the new codes (stored order) and the objective trace ``[f0, f1, ...]``. ``order`` is the visiting order
    as a permutation of *stored* columns (None: stored order).
    """
    out, inp = target.shape
    perm = grid.perm
    w = target if perm is None else target[:, perm]
    h = hessian if perm is None else hessian[perm][:, perm]
    visit = order
    if visit is not None:
        h = h[visit][:, visit]

    def cols(t: torch.Tensor) -> torch.Tensor:
        return t if visit is None else t[:, visit]

    # Transposed (one contiguous row per input column) for fast rank-1 updates.
    wt = cols(w).to(dtype).T.contiguous()
    h = h.to(dtype).contiguous()
    st, zt = cols(grid.scale).to(dtype).T.contiguous(), cols(grid.zero).to(dtype).T.contiguous()
    ct = cols(codes).to(dtype).T.contiguous()
    qt = (ct - zt) * st
    hd = h.diagonal().clone()
    live = (hd > 0).tolist()
    rt = h @ (wt - qt)
    trace = [float(((wt - qt) * rt).sum(dtype=torch.float64))]
    for _ in range(iters):
        for b0 in range(0, inp, block_size):
            b1 = min(b0 + block_size, inp)
            rb = rt[b0:b1].clone()
            dq = torch.zeros(b1 - b0, out, dtype=dtype, device=wt.device)
            k = b1 - b0
            for s0 in range(0, k, 16):  # sub-blocks keep the rank-1 updates small (single-threaded in torch)
                s1 = min(s0 + 16, k)
                for i in range(s0, s1):
                    j = b0 + i
                    if not live[j]:
                        continue
                    u = qt[j] + rb[i] / hd[j]
                    c = torch.clamp(torch.round(u / st[j]) + zt[j], 0, grid.maxq)
                    qn = (c - zt[j]) * st[j]
                    torch.sub(qn, qt[j], out=dq[i])
                    ct[j] = c
                    qt[j] = qn
                    if i + 1 < s1:
                        rb[i + 1:s1].addr_(h[j, j + 1:b0 + s1], dq[i], alpha=-1.0)
                if s1 < k:
                    rb[s1:].addmm_(h[b0 + s0:b0 + s1, b0 + s1:b1].T, dq[s0:s1], alpha=-1.0)
            rt.addmm_(h[:, b0:b1], dq, alpha=-1.0)
        rt = h @ (wt - qt)  # refresh: keeps float32 drift out of the next pass and the trace
        trace.append(float(((wt - qt) * rt).sum(dtype=torch.float64)))
        if tol > 0 and trace[-2] - trace[-1] <= tol * abs(trace[-2]):
            break
    c = ct.T
    if visit is not None:
        inv = torch.empty_like(visit)
        inv[visit] = torch.arange(inp, device=visit.device)
        c = c[:, inv]
    return c.float().contiguous(), trace


def warm_start(w: torch.Tensor, hessian: torch.Tensor, fmt: IntGroup, init: str, damp: float, layer: str,
               grid: str = "minmax") -> IntGroupWeight:
    if init == "gptq":
        return gptq_quantize(w, hessian, fmt, damp=damp, act_order=True, grid=grid, layer=layer)
    perm = act_order_perm(hessian) if fmt.act_order else None
    return quantize_rtn(w.float(), fmt, perm)


def quantease_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: IntGroup, *, iters: int = 20, init: str = "gptq",
                       damp: float = 0.01, tol: float = 1e-4, act_order: bool = True, grid: str = "minmax",
                       layer: str = "<layer>") -> tuple[IntGroupWeight, list[float]]:
    """QuantEase as a function: returns the quantized weight and the objective trace (non-increasing)."""
    check_hessian(hessian, w.shape[1], layer)
    start = warm_start(w, hessian, fmt, init, damp, layer, grid)
    grid, codes = Grid.of(start)
    h = hessian.float()
    visit = None
    if act_order:
        hs = h if grid.perm is None else h[grid.perm][:, grid.perm]
        visit = act_order_perm(hs)
    new_codes, trace = cd_passes(w.float(), h, grid, codes, iters=iters, tol=tol, order=visit)
    _, scale, zero = start.unpacked()
    return IntGroupWeight.from_codes(fmt, new_codes.to(torch.int64), scale, zero, grid.perm), trace


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantEase(Method):
    """``QuantEase(format=IntGroup(bits=3, group_size=64), iters=20, init="gptq")``."""

    name: ClassVar[str] = "quantease"
    requires: ClassVar[frozenset[Stat]] = frozenset({Stat.GRAM})
    format_types: ClassVar[tuple[type, ...]] = (IntGroup,)

    iters: int = 20
    init: str = "gptq"  # "gptq" | "rtn"
    damp: float = 0.01  # for the GPTQ warm start only
    tol: float = 1e-4
    act_order: bool = True
    grid: str = "imatrix"  # grid of the GPTQ warm start (clipped, see GPTQ.grid; "minmax": the reference's)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"QuantEase.iters must be a non-negative integer, got {self.iters!r}")
        if self.init not in ("gptq", "rtn"):
            raise ConfigError(f"QuantEase.init must be 'gptq' or 'rtn', got {self.init!r}")

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        cw, _ = quantease_quantize(w, stats.hessian(self.name, layer), self.format, iters=self.iters, init=self.init,
                                   damp=self.damp, tol=self.tol, act_order=self.act_order, grid=self.grid,
                                   layer=layer)
        return cw
