"""Structured projections, analytic and data-free: ``kpsvd`` (sum of Kronecker products) and ``monarch``.

KPSVD (Van Loan & Pitsianis 1993; SoKA, arXiv 2506.15251): rearrange ``W [m1 m2, n1 n2]`` into
``R(W) [m1 n1, m2 n2]`` with ``R(W)[(i, j), (k, l)] = W[i m2 + k, j n2 + l]``; the best ``t``-term Kronecker sum in
Frobenius norm is the rank-``t`` truncated SVD of ``R(W)``: ``B_t = reshape(sqrt(s_t) u_t)``,
``C_t = reshape(sqrt(s_t) v_t)``; the error is ``sqrt(sum_{i>t} s_i^2)``.

Monarch projection (Dao et al., ICML 2022; HazyResearch/fly ``blockdiag_butterfly_projection``): in the convention of
:mod:`tensorslim.formats.monarch` every ``s x p`` slice ``(l, k)`` of ``W`` is an independent rank-``r`` product
``L[l, :, k r:(k+1) r] @ R[k, l r:(l+1) r, :]``, so the Frobenius-optimal projection is a truncated SVD of each of
the ``b^2`` slices (one batched SVD), split ``sqrt(sigma)`` to each side. Exact for a matrix of that structure.
Limits: a generic (Gaussian-like) matrix is far from both structures; the projections suit structured weights.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..formats.base import CompressedWeight, check_weight
from ..formats.kronecker import Kronecker, KroneckerWeight
from ..formats.monarch import Monarch, MonarchWeight
from ..stats import LayerStats
from .base import Method


def kronecker_project(w: torch.Tensor, terms: int, m1: int, n1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``terms``-term Kronecker sum of ``w``: ``b [terms, m1, n1]``, ``c [terms, m2, n2]`` (float32)."""
    out, inp = w.shape
    m2, n2 = out // m1, inp // n1
    r = w.detach().double().reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    root = s[:terms].sqrt()
    b = (u[:, :terms] * root).T.reshape(terms, m1, n1)
    c = (root[:, None] * vh[:terms]).reshape(terms, m2, n2)
    return b.float(), c.float()


def monarch_project(w: torch.Tensor, blocks: int, rank: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Best Monarch factors of ``w`` (see :mod:`tensorslim.formats.monarch`): ``l [b, s, b r]``, ``r [b, b r, p]``."""
    out, inp = w.shape
    b = blocks
    s, p = out // b, inp // b
    t = w.detach().double().reshape(b, s, b, p).permute(0, 2, 1, 3)  # [l, k, s, p]
    u, sig, vh = torch.linalg.svd(t, full_matrices=False)
    root = sig[..., :rank].sqrt()  # [l, k, r]
    left = u[..., :rank] * root[..., None, :]  # [l, k, s, r]
    right = root[..., :, None] * vh[..., :rank, :]  # [l, k, r, p]
    l_blocks = left.permute(0, 2, 1, 3).reshape(b, s, b * rank)  # [l, s, (k, t)]
    r_blocks = right.permute(1, 0, 2, 3).reshape(b, b * rank, p)  # [k, (l, t), p]
    return l_blocks.float(), r_blocks.float()


@dataclasses.dataclass(frozen=True, kw_only=True)
class KPSVD(Method):
    name: ClassVar[str] = "kpsvd"
    format_types: ClassVar[tuple[type, ...]] = (Kronecker,)

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        shape = (int(w.shape[0]), int(w.shape[1]))
        fmt = self.format
        assert isinstance(fmt, Kronecker)
        fmt.check(shape, layer)
        m1, n1, _, _ = fmt.factor_shapes(shape)
        b, c = kronecker_project(w, fmt.terms, m1, n1)
        return KroneckerWeight.from_factors(fmt, shape, b, c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MonarchProjection(Method):
    name: ClassVar[str] = "monarch"
    format_types: ClassVar[tuple[type, ...]] = (Monarch,)

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        shape = (int(w.shape[0]), int(w.shape[1]))
        fmt = self.format
        assert isinstance(fmt, Monarch)
        fmt.check(shape, layer)
        lb, rb = monarch_project(w, fmt.blocks, fmt.rank)
        return MonarchWeight.from_factors(fmt, shape, lb, rb)
