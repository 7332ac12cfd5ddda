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
Error rule (``"error"``, data-aware when given whitened spectra): the i-th squared singular value of ``W L``
(``L L^T = X^T X / N``) is exactly what the activation-weighted error ``||X (W - W')^T||^2 / N`` grows by when that
rank is dropped, at a saving of ``out + in`` parameters. Normalized per matrix by ``||W L||_F^2 = sum s^2`` (the
relative error, so matrices of different output scale are comparable), each rank is an item of value
``s_i^2 / sum s^2 / (out + in)``; one global threshold keeps the items above it (a greedy fill, optimal for the
relaxed knapsack). Dense is an option with error 0 and cost ``out * in``: a matrix stays dense when its kept rank
reaches the break-even ``out*in/(out+in)``, or when its normalized tail error exceeds the threshold times the
parameters the factorization would save (the Lagrangian choice). Method ``svd-whitened-global`` runs this rule on
the whitened spectra of a dense-model Gram pass (:func:`tensorslim.calib.fisher.prepare_assign`).

Methods ``welore`` (plain SVD factors, rule on ``W``'s spectra) and ``welore-whitened`` (activation-whitened SVD
factors, needs GRAM; rule on ``W``'s spectra by default, as the paper, ``spectra="whitened"`` for ``W L``'s) take
``lowrank:<fraction>`` and an optional ``rule``. Allocation is global, so the runner calls ``method.resolve(weights)``
(through :func:`tensorslim.calib.fisher.prepare_assign`) once, before the block loop, and gets a per-layer table of
fixed-rank copies (or ``None`` = keep dense). ``apply`` on an unresolved method raises :class:`ConfigError`.
Limit: one SVD per matrix (float32 ``svdvals``); a target no allocation reaches raises :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.lowrank import LowRank, uniform_rank
from ..stats import LayerStats
from .base import Method
from .lowrank import whitening
from .svd import SVD, WhitenedSVD

Rule = Literal["welore", "energy", "uniform", "error"]
RULES = ("welore", "energy", "uniform", "error")


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
    if rule == "error":
        return _allocate_error(sv, shapes, target_reduction)

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


def _allocate_error(sv: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, int]], target: float) -> dict[str, int | None]:
    """The ``error`` rule (module note): one threshold on normalized squared singular values per parameter."""
    dens, tails = {}, {}
    for n, s in sv.items():
        e = s.double().square()
        e = e / e.sum().clamp(min=1e-300)
        dens[n] = (e / sum(shapes[n])).flip(0)  # ascending
        tails[n] = torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])  # tails[k] = sum_{i >= k} e_i

    def ranks_at(t: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for n, d in dens.items():
            o, i = shapes[n]
            k = max(1, len(d) - int(torch.searchsorted(d, torch.tensor(t, dtype=d.dtype), right=True)))
            saves = o * i - k * (o + i)
            out[n] = k if saves > 0 and float(tails[n][k]) <= t * saves else None
        return out

    total = sum(o * i for o, i in shapes.values())
    budget = (1.0 - target) * total
    best = ranks_at(math.inf)
    if sum(stored_params(shapes[n], k) for n, k in best.items()) > budget:
        raise ConfigError(f"rule 'error' cannot remove {target:.0%} of the parameters of these matrices "
                          f"(at most {_reduction(shapes, best):.1%}); lower the target")
    lo, hi = -40.0, 10.0  # log10 of the threshold: stored parameters shrink as it grows
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        ranks = ranks_at(10.0 ** mid)
        if sum(stored_params(shapes[n], k) for n, k in ranks.items()) <= budget:
            best, hi = ranks, mid
        else:
            lo = mid
    # fill the slack the threshold leaves: the next ranks by value per parameter while they fit
    slack = budget - sum(stored_params(shapes[n], k) for n, k in best.items())
    while True:
        pick, val = None, -1.0
        for n, k in best.items():
            o, i = shapes[n]
            if k is not None and (k + 1) * (o + i) < o * i and o + i <= slack:
                v = float(dens[n][len(dens[n]) - 1 - k])  # e_k / (out + in), dens is ascending
                if v > val:
                    pick, val = n, v
        if pick is None:
            return best
        best[pick] = int(best[pick]) + 1  # type: ignore[arg-type]
        slack -= sum(shapes[pick])


Spectra = Literal["weight", "whitened"]


def whitened_spectra(weights: Mapping[str, torch.Tensor], grams: Mapping[str, torch.Tensor],
                     damp: float = 0.0) -> dict[str, torch.Tensor]:
    """Singular values of ``W L`` (``L L^T`` = each layer's ``X^T X / N``): the spectra whitened SVD truncates."""
    out = {}
    for n, w in weights.items():
        check_weight(w, n)
        wh = whitening(grams[n], damp=damp, layer=n)
        out[n] = torch.linalg.svdvals(wh.right(w.detach().double()).float())
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeLore(SVD):
    """``welore``: global WeLore (or ``rule``) allocation on the weights' spectra, plain SVD factors."""

    name: ClassVar[str] = "welore"
    rule: Rule = "welore"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in RULES:
            raise ConfigError(f"{self.name}: rule must be one of {RULES}, got {self.rule!r}")

    @property
    def resolve_needs_grams(self) -> bool:
        """Whether :meth:`resolve` needs each layer's ``X^T X / N`` (``prepare_assign`` then runs a dense Gram pass)."""
        return False

    def _spectra(self, weights: Mapping[str, torch.Tensor],
                 grams: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        return None  # the weights' own spectra (computed by allocate_ranks)

    def resolve(self, weights: Mapping[str, torch.Tensor],
                grams: Mapping[str, torch.Tensor] | None = None) -> dict[str, Method | None]:
        """Per-layer fixed-rank copies (``None`` = keep dense) for the layers in ``weights``."""
        fmt = self.format
        assert isinstance(fmt, LowRank)
        if fmt.rank is not None:
            return {n: self for n in weights}
        sv = self._spectra(weights, grams)
        ranks = allocate_ranks(weights, float(fmt.reduction), self.rule, spectra=sv)  # type: ignore[arg-type]
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
    """``welore-whitened``: WeLore ranks, activation-whitened SVD factors (needs GRAM).

    ``spectra``: which singular values the rule reads. ``"weight"`` (default): ``W``'s own, the paper's data-free
    statistic; ``"whitened"``: those of ``W L``, the matrix whitened SVD truncates (its tail is exactly the
    activation-weighted error of a rank), from a dense-model Gram pass that
    :func:`tensorslim.calib.fisher.prepare_assign` runs before the block loop. On SmolLM2's standard protocol the
    paper's rule is better at 20% (54.3 vs 61.4 perplexity) and worse at 40% (627 vs 360), and it needs no dense
    Gram pass (159 s on the 2-core machine, on top of the 108 s whole compression with W's spectra;
    docs/results/lowrank.md, session 4), hence the default.
    """

    name: ClassVar[str] = "welore-whitened"
    spectra: Spectra = "weight"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spectra not in ("weight", "whitened"):
            raise ConfigError(f"{self.name}: spectra must be 'weight' or 'whitened', got {self.spectra!r}")

    @property
    def resolve_needs_grams(self) -> bool:
        return self.spectra == "whitened"

    def _spectra(self, weights: Mapping[str, torch.Tensor],
                 grams: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        if self.spectra == "weight":
            return None
        if grams is None or set(weights) - set(grams):
            raise ConfigError(f"{self.name} (spectra='whitened') allocates ranks from the layers' X^T X: call it "
                              "through tensorslim.calib.fisher.prepare_assign with calibration data (or pass grams=)")
        return whitened_spectra(weights, grams, float(self.damp))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlobalWhitenedSVD(WeLoreWhitened):
    """``svd-whitened-global``: rule ``error`` on whitened spectra (data-aware ranks), whitened SVD factors.

    ``resolve`` needs ``grams`` (name -> ``X^T X / N`` of the *dense* model), which
    :func:`tensorslim.calib.fisher.prepare_assign` collects in one forward pass before the runner's block loop.
    """

    name: ClassVar[str] = "svd-whitened-global"
    rule: Rule = "error"
    spectra: Spectra = "whitened"
