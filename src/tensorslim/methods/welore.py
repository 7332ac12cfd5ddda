"""Global rank allocation to a parameter-reduction target: WeLore, an energy threshold, and uniform (LoRD-style).

WeLore (Jaiswal et al., arXiv 2407.11239; VITA-Group/welore ``adaptive_rank_pruning``), data-free: per matrix the
singular values are min-max normalized, ``s_hat = (s - min s) / (max s - min s)``; one global threshold ``tau``
prunes ``#{s_hat < tau}`` ranks of every matrix. A matrix becomes a low-rank component (LRC) only if its kept rank
``k`` stores fewer parameters than the dense matrix (``k (out + in) < out * in``); the others stay dense (``None``).
The repo hard-codes ``tau`` per target for LLaMA-2; here ``tau`` is found by bisection on the *parameter* reduction
``1 - sum(stored) / sum(out * in)`` over the given matrices (parameters, not "effective rank", since that is what the
issue's budget and the comparison at equal parameter count need).
Energy rule: one global energy fraction ``e``; each matrix keeps the smallest ``k`` with
``sum_{i<k} s_i^2 >= e * sum s_i^2`` (dense if that does not save parameters); ``e`` found by bisection.
Uniform rule (LoRD-style baseline): every matrix loses the same fraction, ``k = floor((1 - f) out in / (out + in))``.

Methods ``welore`` (plain SVD factors) and ``welore-whitened`` (activation-whitened SVD factors, needs GRAM) take
``lowrank:<fraction>`` and an optional ``rule``. Allocation is global, so the runner calls ``method.resolve(weights)``
(through :func:`tensorslim.calib.fisher.prepare_assign`) once, before the block loop, and gets a per-layer table of
fixed-rank copies (or ``None`` = keep dense). ``apply`` on an unresolved method raises :class:`ConfigError`.
Limit: one SVD per matrix (float32 ``svdvals``); a target no allocation reaches raises :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.lowrank import LowRank, uniform_rank
from ..stats import LayerStats
from .base import Method
from .svd import SVD, WhitenedSVD

Rule = Literal["welore", "energy", "uniform"]
RULES = ("welore", "energy", "uniform")


def singular_values(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Descending float32 singular values of every matrix (the data-free statistic of WeLore)."""
    out = {}
    for name, w in weights.items():
        check_weight(w, name)
        out[name] = torch.linalg.svdvals(w.detach().float())
    return out


def stored_params(shape: tuple[int, int], rank: int | None) -> int:
    o, i = shape
    return o * i if rank is None else rank * (o + i)


def _keep(shape: tuple[int, int], k: int) -> int | None:
    o, i = shape
    return k if k * (o + i) < o * i else None


def _reduction(shapes: dict[str, tuple[int, int]], ranks: Mapping[str, int | None]) -> float:
    total = sum(o * i for o, i in shapes.values())
    return 1.0 - sum(stored_params(shapes[n], ranks[n]) for n in shapes) / total


def allocate_ranks(
    weights: Mapping[str, torch.Tensor],
    target_reduction: float,
    rule: Rule = "welore",
    *,
    spectra: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, int | None]:
    """Per-matrix kept rank (``None`` = keep dense) removing at least ``target_reduction`` of the parameters.

    ``spectra`` (from :func:`singular_values`) avoids recomputing the SVDs when several targets are tried.
    """
    if not 0.0 < target_reduction < 1.0:
        raise ConfigError(f"target_reduction must be in (0, 1), got {target_reduction!r}")
    if rule not in RULES:
        raise ConfigError(f"rank rule must be one of {RULES}, got {rule!r}")
    if not weights:
        return {}
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
    if rule == "uniform":
        return {n: uniform_rank(s, target_reduction) for n, s in shapes.items()}
    sv = dict(spectra) if spectra is not None else singular_values(weights)

    if rule == "welore":
        norm = {}
        for n, s in sv.items():
            s = s.double()
            span = float(s.max() - s.min())
            norm[n] = ((s - s.min()) / span if span > 0 else torch.ones_like(s)).flip(0)  # ascending

        def ranks_at(tau: float) -> dict[str, int | None]:
            return {n: _keep(shapes[n], len(a) - int(torch.searchsorted(a, torch.tensor(tau, dtype=a.dtype))))
                    for n, a in norm.items()}
        lo, hi = 0.0, 1.0  # reduction grows with tau: find the smallest tau reaching the target
        grows = True
    else:
        cum = {}
        for n, s in sv.items():
            e = s.double() ** 2
            cum[n] = e.cumsum(0) / e.sum().clamp(min=1e-300)

        def ranks_at(tau: float) -> dict[str, int | None]:
            return {n: _keep(shapes[n], min(len(c), int(torch.searchsorted(c, torch.tensor(tau, dtype=c.dtype))) + 1))
                    for n, c in cum.items()}
        lo, hi = 0.0, 1.0  # reduction shrinks as the energy kept grows: find the largest e reaching the target
        grows = False

    best = ranks_at(hi if grows else lo)
    if _reduction(shapes, best) < target_reduction:
        raise ConfigError(f"rule {rule!r} cannot remove {target_reduction:.0%} of the parameters of these matrices "
                          f"(at most {_reduction(shapes, best):.1%}); lower the target")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ranks = ranks_at(mid)
        ok = _reduction(shapes, ranks) >= target_reduction
        if ok:
            best = ranks
        if ok == grows:
            hi = mid
        else:
            lo = mid
    return best


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeLore(SVD):
    """``welore``: global WeLore (or ``rule``) allocation, plain SVD factors."""

    name: ClassVar[str] = "welore"
    rule: Rule = "welore"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in RULES:
            raise ConfigError(f"{self.name}: rule must be one of {RULES}, got {self.rule!r}")

    def resolve(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Method | None]:
        """Per-layer fixed-rank copies (``None`` = keep dense) for the layers in ``weights``."""
        fmt = self.format
        assert isinstance(fmt, LowRank)
        if fmt.rank is not None:
            return {n: self for n in weights}
        ranks = allocate_ranks(weights, float(fmt.reduction), self.rule)  # type: ignore[arg-type]
        return {n: None if k is None else dataclasses.replace(self, format=LowRank(rank=k, dtype=fmt.dtype))
                for n, k in ranks.items()}

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        if self.format.rank is None:  # type: ignore[attr-defined]
            raise ConfigError(
                f"{self.name} {self.format.spec()} allocates ranks across layers: resolve it first with "
                "tensorslim.calib.fisher.prepare_assign(model, adapter, assign, batches) (or method.resolve(weights))"
            )
        return super().apply(w, stats, layer=layer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeLoreWhitened(WeLore, WhitenedSVD):
    """``welore-whitened``: WeLore ranks (data-free), activation-whitened SVD factors (needs GRAM)."""

    name: ClassVar[str] = "welore-whitened"
