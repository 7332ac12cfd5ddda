"""SparseGPT: the OBS column loop (:mod:`.obs`, shared with GPTQ) with a mask projection.

Paper: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (arXiv
2301.00774); reference IST-DASLab/sparsegpt. With ``U`` the upper Cholesky factor of ``(H + damp)^{-1}``, the OBS
saliency of weight ``w_rj`` is ``w_rj^2 / U_jj^2``; the mask is chosen on the *updated* weights
- unstructured: at the start of each block of ``block_size`` columns, the lowest-saliency ``p_b`` entries of the
  ``[out, block]`` block are pruned, ``p_b = floor(s*out*i2) - floor(s*out*i1)`` so the matrix loses exactly
  ``floor(s*out*in)`` (the reference prunes ``int(s*numel)`` per block);
- N:M: at every ``m``-th column, each row prunes its ``m - n`` lowest saliencies among the next ``m`` columns;
- group sparsity (GQSA): at the start of each block, whole groups of ``g`` inputs by summed saliency (blocks are
  rounded to a multiple of ``g``), exact total as for unstructured.
A pruned weight is projected to 0 and its error ``w / U_jj`` moves onto the columns not yet solved (the OBS update).
Joint quantization (``sparse:2:4+int4:g64``, ``groupsparse:0.5+int4:g64``): kept weights are also rounded to the
inner ``IntGroup`` grid in the same pass (as GPTQ does); each scale group's grid is fitted, at the group's first
column, on its kept (mask-selected) values with pruned entries at zero, so the masks of a whole scale group are
chosen at its first column. Stored: the format's weight; ``decode()`` equals the loop's projected matrix.
Limits: float32 solve, natural column order (no act-order), ``O(in^2)`` memory for ``H``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, IntGroupWeight, fit_scale_zero, quantize_codes
from ..formats.sparse import GroupSparse, Sparse, encode_group_sparse, encode_sparse, prune_count
from ..stats import LayerStats, Stat
from .base import Method
from .obs import obs_solve
from .prune import _flat_lowest, _lowest_mask

__all__ = ["SparseGPT", "sparsegpt_prune"]


class MaskProjector:
    """OBS projection for a sparse format: chooses masks on the fly, zeroes pruned weights, optionally quantizes."""

    def __init__(self, fmt: Sparse | GroupSparse, out: int, inp: int, block_size: int, device: torch.device) -> None:
        self.fmt, self.out, self.inp, self.bs = fmt, out, inp, block_size
        self.keep_t = torch.ones(inp, out, dtype=torch.bool, device=device)  # row j = column j's keep mask
        q = fmt.inner
        if q is not None and not isinstance(q, IntGroup):
            raise ConfigError(f"SparseGPT quantizes survivors only onto IntGroup grids, got inner {q.spec()}")
        self.q: IntGroup | None = q
        self.g = None if q is None else q.group(inp if isinstance(fmt, Sparse) else fmt.group_size)
        self._s = self._z = None
        self.scale_t: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # first column of a scale group -> grid

    def _choose(self, block: torch.Tensor, i: int, j: int, diag: torch.Tensor) -> None:
        fmt, k = self.fmt, block.shape[1]
        sal = block.pow(2) / diag[None, :].pow(2)
        if isinstance(fmt, GroupSparse):
            if i == 0:
                g = fmt.group_size  # groups seen so far: out per group column; exact running totals
                n_before = prune_count(self.out * (j // g), fmt.sparsity)
                n_after = prune_count(self.out * ((j + k) // g), fmt.sparsity)
                gs = sal.reshape(self.out, k // g, g).sum(-1)
                pruned = _flat_lowest(gs, n_after - n_before).repeat_interleave(g, 1)
                self.keep_t[j:j + k] = ~pruned.T
        elif fmt.is_nm:
            m, n = fmt.m, fmt.n
            span = max(self.g or m, m)  # a whole scale group at once when quantizing jointly
            if (j % span) == 0:
                w = min(span, k - i)
                grouped = sal[:, i:i + w].reshape(self.out * (w // m), m)
                pruned = _lowest_mask(grouped, torch.full((grouped.shape[0],), m - n, device=block.device))
                self.keep_t[j:j + w] = ~pruned.reshape(self.out, w).T
        elif i == 0:
            n = prune_count(self.out * (j + k), float(fmt.sparsity)) - prune_count(self.out * j, float(fmt.sparsity))
            self.keep_t[j:j + k] = ~_flat_lowest(sal, n).T

    def __call__(self, block: torch.Tensor, i: int, start: int, diag: torch.Tensor) -> torch.Tensor:
        j = start + i
        self._choose(block, i, j, diag)
        keep = self.keep_t[j]
        col = block[:, i] * keep
        if self.q is None:
            return col
        if j % self.g == 0:
            span = block[:, i:i + self.g] * self.keep_t[j:j + self.g].T
            self._s, self._z = fit_scale_zero(span, self.q)
            self.scale_t[j] = (self._s, self._z)
        c = quantize_codes(col[:, None], self._s, self._z, self.q.maxq)[:, 0]
        return (c - self._z) * self._s * keep

    def keep(self) -> torch.Tensor:
        return self.keep_t.T

    def grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale / zero ``[out, in/g]`` in column order of their groups."""
        cols = sorted(self.scale_t)
        return (torch.stack([self.scale_t[c][0] for c in cols], 1), torch.stack([self.scale_t[c][1] for c in cols], 1))


def _inner_from_grid(fmt: IntGroup, values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> IntGroupWeight:
    """Encode already-on-grid values ``[rows, n]`` with their grid (codes are recomputed exactly)."""
    rows, n = values.shape
    g = fmt.group(n)
    codes = quantize_codes(values.reshape(rows, n // g, g), scale, zero, fmt.maxq).reshape(rows, n).to(torch.int64)
    return IntGroupWeight.from_codes(fmt, codes, scale, zero)


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, fmt: Sparse | GroupSparse, *, damp: float = 0.01,
                    block_size: int = 128, layer: str = "<layer>") -> CompressedWeight:
    """The SparseGPT solve as a function: ``W [out, in]``, ``H [in, in]`` -> the format's weight (module note)."""
    out, inp = w.shape
    unit = fmt.group_size if isinstance(fmt, GroupSparse) else (fmt.m if fmt.is_nm else 1)
    inner_g = None
    if isinstance(fmt.inner, IntGroup):
        inner_g = fmt.inner.group(inp if isinstance(fmt, Sparse) else fmt.group_size)
        unit = max(unit, inner_g)
    bs = max(block_size // unit, 1) * unit
    proj = MaskProjector(fmt, out, inp, bs, w.device)
    res = obs_solve(w, hessian, proj, block_size=bs, damp=damp, layer=layer)
    keep = proj.keep()
    q = res.q
    if isinstance(fmt, GroupSparse):
        gm = keep.reshape(out, inp // fmt.group_size, fmt.group_size)[:, :, 0]
        inner = None
        if fmt.inner is not None:
            scale, zero = proj.grids()  # [out, in/gi] per inner group, all groups (pruned ones too)
            gi = inner_g
            per = fmt.group_size // gi
            blocks = q.reshape(out, inp // fmt.group_size, fmt.group_size)[gm]
            sel = gm.repeat_interleave(per, 1)
            inner = _inner_from_grid(fmt.inner, blocks, scale[sel].reshape(-1, per), zero[sel].reshape(-1, per))
        return encode_group_sparse(fmt, q, gm, inner=inner)
    inner = None
    if fmt.inner is not None:
        scale, zero = proj.grids()
        compact = q[keep].reshape(fmt.compact_shape((out, inp)))
        inner = _inner_from_grid(fmt.compact_format(), compact, scale, zero)  # type: ignore[arg-type]
    return encode_sparse(fmt, q, keep, inner=inner)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPT(Method):
    """``SparseGPT(format=Sparse(n=2, m=4, inner=IntGroup(bits=4, group_size=64)), damp=0.01, block_size=128)``."""

    name: ClassVar[str] = "sparsegpt"
    requires: ClassVar[frozenset[Stat]] = frozenset({Stat.GRAM})
    format_types: ClassVar[tuple[type, ...]] = (Sparse, GroupSparse)

    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 10):
            raise ConfigError(f"SparseGPT.damp must be a fraction in [0, 10), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"SparseGPT.block_size must be a positive integer, got {self.block_size!r}")

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        return sparsegpt_prune(w.float(), stats.hessian(self.name, layer), self.format,  # type: ignore[arg-type]
                               damp=self.damp, block_size=self.block_size, layer=layer)
