"""Score-based pruning: magnitude and Wanda (Sun et al., "A Simple and Effective Pruning Approach for LLMs", 2023).

Score of weight ``W_ij`` (``[out, in]``): magnitude ``|W_ij|``; Wanda ``|W_ij| * ||X_j||_2`` (the input channel's norm
over the calibration tokens, statistic NORMS). The lowest scores are removed, compared within
- unstructured: the whole matrix (``scope="layer"``, magnitude's default) or each output row (``scope="row"``, Wanda's
  default and the paper's choice); the row counts are balanced so the matrix loses exactly ``floor(s*out*in)``;
- N:M: each run of ``m`` consecutive inputs of a row keeps its ``n`` best;
- group sparsity (GQSA): a group of ``g`` inputs of one row scores ``sum score^2`` (the squared error its removal
  would cause for Wanda), and the matrix keeps its best ``K`` groups (exact count, rows may differ).
Survivors keep their dense values (no update: that is what SparseGPT adds); with an inner format (``sparse:2:4+int4:g64``,
``groupsparse:0.5+int4:g64``) they are quantized by round-to-nearest.
The mask helpers here are shared by SparseGPT and M-FAC.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.sparse import GroupSparse, Sparse, encode_group_sparse, encode_sparse, prune_count
from ..stats import LayerStats, Stat
from .base import Method

__all__ = ["Magnitude", "Wanda", "encode_mask", "select_mask", "balanced_row_counts"]

Scope = Literal["layer", "row"]


def balanced_row_counts(out: int, total: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``out`` per-row counts summing to ``total``, as equal as possible (the first rows take the remainder)."""
    base, extra = divmod(total, out)
    counts = torch.full((out,), base, dtype=torch.long, device=device)
    counts[:extra] += 1
    return counts


def _lowest_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, True (pruned) at the ``counts[r]`` lowest scores (ties broken by position, deterministically)."""
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks < counts[:, None]


def select_mask(scores: torch.Tensor, fmt: Sparse | GroupSparse, *, scope: Scope = "layer") -> torch.Tensor:
    """Keep mask from saliency ``scores`` ``[out, in]`` (higher = keep): ``[out, in]`` for Sparse, ``[out, in/g]``
    for GroupSparse. Exact counts: N:M per group, ``floor(s*out*in)`` (or groups) removed otherwise."""
    out, inp = scores.shape
    s = scores.float()
    if isinstance(fmt, GroupSparse):
        g = fmt.group_size
        gs = s.reshape(out, inp // g, g).pow(2).sum(-1)
        return ~_flat_lowest(gs, prune_count(gs.numel(), fmt.sparsity))
    if fmt.is_nm:
        m, n = fmt.m, fmt.n
        grouped = s.reshape(out * (inp // m), m)  # type: ignore[operator]
        pruned = _lowest_mask(grouped, torch.full((grouped.shape[0],), m - n, device=s.device))  # type: ignore[operator]
        return ~pruned.reshape(out, inp)
    total = prune_count(out * inp, float(fmt.sparsity))  # type: ignore[arg-type]
    if scope == "row":
        return ~_lowest_mask(s, balanced_row_counts(out, total, s.device))
    return ~_flat_lowest(s, total)


def _flat_lowest(s: torch.Tensor, k: int) -> torch.Tensor:
    flat = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
    if k:
        flat[torch.argsort(s.reshape(-1), stable=True)[:k]] = True
    return flat.reshape(s.shape)


def encode_mask(fmt: Sparse | GroupSparse, w: torch.Tensor, keep: torch.Tensor) -> CompressedWeight:
    """Store ``w`` under a keep mask from :func:`select_mask` (inner formats by round-to-nearest)."""
    if isinstance(fmt, GroupSparse):
        return encode_group_sparse(fmt, w, keep)
    return encode_sparse(fmt, w, keep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScorePrune(Method):
    format_types: ClassVar[tuple[type, ...]] = (Sparse, GroupSparse)
    scope: Scope = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("layer", "row"):
            raise ConfigError(f"{type(self).__name__}.scope must be 'layer' or 'row', got {self.scope!r}")

    def scores(self, w: torch.Tensor, stats: LayerStats, layer: str) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        w = w.float()
        keep = select_mask(self.scores(w, stats, layer), self.format, scope=self.scope)  # type: ignore[arg-type]
        return encode_mask(self.format, w, keep)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Magnitude(_ScorePrune):
    """Remove the smallest ``|W_ij|``: data-free, the baseline. ``Magnitude(format=Sparse(sparsity=0.5))``."""

    name: ClassVar[str] = "magnitude"

    def scores(self, w: torch.Tensor, stats: LayerStats, layer: str) -> torch.Tensor:
        return w.abs()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wanda(_ScorePrune):
    """Remove the smallest ``|W_ij| * ||X_j||``, compared per output row. ``Wanda(format=Sparse(n=2, m=4))``."""

    name: ClassVar[str] = "wanda"
    requires: ClassVar[frozenset[Stat]] = frozenset({Stat.NORMS})
    scope: Scope = "row"

    def scores(self, w: torch.Tensor, stats: LayerStats, layer: str) -> torch.Tensor:
        norms = stats.channel_norms(self.name, layer).to(w.device, torch.float32)
        if norms.shape != (w.shape[1],):
            raise ConfigError(f"layer {layer!r}: input norms have shape {tuple(norms.shape)}, expected ({w.shape[1]},)")
        return w.abs() * norms[None, :]
