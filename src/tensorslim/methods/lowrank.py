"""One weighted low-rank routine for plain SVD, activation-whitened SVD, Fisher-weighted SVD and EoRA.

Problem: ``min_{rank(M') <= r} || L (M - M') R ||_F`` with ``L = diag(row_weight)`` (FWSVD on output rows),
``R = diag(col_weight)`` (FWSVD on input columns) or ``R = S`` a factor of the input second moment ``H = X^T X / N``
with ``S S^T = H`` (activation whitening: ``||(M - M') X^T||_F^2 = N ||(M - M') S||_F^2``; SVD-LLM/ASVD-style
compression with ``M = W``, EoRA (Liu et al., arXiv 2410.21271) with ``M = W - W_c``). Eckart-Young in the weighted
norm: ``L M R = U Sigma V^T`` and ``M' = L^{-1} U_r Sigma_r V_r^T R^{-1}``, stored as ``u = L^{-1} U_r Sigma_r^{1/2}``
and ``v = Sigma_r^{1/2} V_r^T R^{-1}`` (balanced factors survive float16 storage).

Whitening uses a Cholesky factor ``H = L L^T`` (float64; any factor with ``S S^T = H`` gives the same optimum,
so this equals EoRA's ``Q Lambda^{1/2}`` in result and is far cheaper than ``eigh`` on CPU); un-whitening is a
triangular solve. Rank-deficient ``H`` (fewer tokens than inputs, dead channels): ``damp`` adds
``damp * mean(diag H)`` first (default 0 keeps the exact optimum); if Cholesky still fails, ridges of
``RIDGE_LADDER`` x ``mean(diag H)`` up to ``SMALL_RIDGE`` are tried, then the PSD projection :func:`psd_floor`
(an ``H`` indefinite beyond rounding, as bf16-accumulated statistics are), then the larger ridges (documented
fallbacks, logged): directions the data never
visits are then fitted with a tiny plain-SVD weight instead of an infinite un-whitening. The decomposition is one
float64 ``eigh`` of the smaller Gram of the weighted matrix (:func:`_top_factors`; faster on CPU than a float32 SVD
and more accurate), everything around it in float64.
Errors: non-finite ``M`` or ``H`` -> :class:`NumericalError` / :class:`CalibrationError`; an all-zero ``H`` ->
:class:`CalibrationError`; ``rank > min(out, in)`` -> :class:`UnsupportedLayerError`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import CalibrationError, NumericalError, UnsupportedLayerError

logger = logging.getLogger(__name__)

RIDGE_LADDER = (1e-8, 1e-6, 1e-4, 1e-2, 1e-1)  # fallback ridges (x mean diag) when Cholesky fails
SMALL_RIDGE = 1e-4  # ridges up to this are tried before the PSD floor (they do not change resolved directions)
EIG_FLOOR = 1e-10  # relative to the largest eigenvalue: the floor of :func:`psd_floor`
WEIGHT_FLOOR = 1e-8  # relative to the largest row/column weight (FWSVD: rows with zero Fisher)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Whitening:
    """A lower-triangular factor ``l`` of ``H`` (``l l^T = H``), float64 ``[in, in]``."""

    l: torch.Tensor

    def right(self, a: torch.Tensor) -> torch.Tensor:
        """``a @ l`` (whiten the input side)."""
        return a @ self.l.to(device=a.device, dtype=a.dtype)

    def unright(self, v: torch.Tensor) -> torch.Tensor:
        """``v @ l^{-1}`` (a triangular solve, no explicit inverse)."""
        return torch.linalg.solve_triangular(self.l.to(device=v.device, dtype=v.dtype), v, upper=False, left=False)


def whitening(h: torch.Tensor, *, damp: float = 0.0, layer: str = "<layer>") -> Whitening:
    """Cholesky whitening factor of a symmetric PSD second moment ``h [in, in]`` (see the module note)."""
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise CalibrationError(f"layer {layer!r}: X^T X must be square, got shape {tuple(h.shape)}")
    h = h.detach().to(torch.float64)
    if not torch.isfinite(h).all():
        raise CalibrationError(f"layer {layer!r}: X^T X has NaN/Inf entries; recollect statistics in float32 "
                               "from finite activations")
    h = 0.5 * (h + h.T)
    mean_diag = float(h.diagonal().mean())
    if mean_diag <= 0.0:
        raise CalibrationError(f"layer {layer!r}: X^T X is zero (no calibration tokens reached this layer?)")
    if damp < 0:
        raise CalibrationError(f"damp must be >= 0, got {damp}")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    small = [damp, *(r for r in RIDGE_LADDER if damp < r <= SMALL_RIDGE)]  # the asked damp first, always
    large = [r for r in RIDGE_LADDER if r > max(damp, SMALL_RIDGE)]
    for ridge in small:
        l = _cholesky(h + ridge * mean_diag * eye if ridge else h)
        if l is not None:
            if ridge != damp:
                logger.info("layer %r: X^T X is singular; whitening with ridge %.0e x mean diag", layer, ridge)
            return Whitening(l=l)
    l = _cholesky(psd_floor(h))
    if l is not None:
        logger.info("layer %r: X^T X is indefinite beyond rounding (low-precision statistics?); whitening its PSD "
                    "projection with eigenvalues floored at the negative part", layer)
        return Whitening(l=l)
    for ridge in large:
        l = _cholesky(h + ridge * mean_diag * eye)
        if l is not None:
            logger.info("layer %r: X^T X is singular; whitening with ridge %.0e x mean diag", layer, ridge)
            return Whitening(l=l)
    raise CalibrationError(f"layer {layer!r}: X^T X is not positive definite even with ridge {RIDGE_LADDER[-1]}")


def _cholesky(h: torch.Tensor) -> torch.Tensor | None:
    l, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0 and bool(torch.isfinite(l).all()) and float(l.diagonal().min()) > 0:
        return l
    return None


def psd_floor(h: torch.Tensor) -> torch.Tensor:
    """``h`` with its eigenvalues raised to ``max(-lambda_min, 1e-10 lambda_max)`` (float64, symmetric).

    A Gram accumulated in low precision (bf16 products) is indefinite at the level of its rounding noise,
    ``|lambda_min| ~ 1e-3 lambda_max``, which can exceed any ridge that is harmless on the other directions. Raising
    only the eigenvalues below the noise level to it keeps every direction the data resolves and gives the
    unresolved ones the noise floor's weight (the change is PSD, of norm at most ``2 |lambda_min|``).
    """
    lam, q = torch.linalg.eigh(h)
    floor = max(-float(lam[0]), EIG_FLOOR * float(lam[-1]))
    out = (q * lam.clamp(min=floor)) @ q.T
    return 0.5 * (out + out.T)


def truncation_rank_check(shape: tuple[int, int], rank: int, layer: str) -> None:
    if rank < 1 or rank > min(shape):
        raise UnsupportedLayerError(
            f"layer {layer!r} with shape {tuple(shape)}: rank {rank} must be in 1..min(out, in) = {min(shape)}"
        )


def weighted_lowrank(
    m: torch.Tensor,
    rank: int,
    *,
    row_weight: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    whiten: Whitening | None = None,
    layer: str = "<layer>",
    svd_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` ``u [out, r] @ v [r, in]`` for ``m [out, in]`` in the weighted norm; float32 factors.

    At most one of ``col_weight`` and ``whiten`` (both weight the input side). All weights ``None`` = truncated SVD.
    """
    if col_weight is not None and whiten is not None:
        raise ValueError("weighted_lowrank: col_weight and whiten both weight the input side; give one")
    truncation_rank_check(tuple(m.shape), rank, layer)  # type: ignore[arg-type]
    a = m.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        raise NumericalError(f"layer {layer!r}: the matrix to factorize has NaN/Inf entries")
    lw = _diag_weight(row_weight, m.shape[0], "row_weight", layer)
    cw = _diag_weight(col_weight, m.shape[1], "col_weight", layer)
    if lw is not None:
        a = lw[:, None] * a
    if cw is not None:
        a = a * cw[None, :]
    if whiten is not None:
        a = whiten.right(a)
    u, v = _top_factors(a, rank, svd_dtype)
    if lw is not None:
        u = u / lw[:, None]
    if cw is not None:
        v = v / cw[None, :]
    if whiten is not None:
        v = whiten.unright(v)
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise NumericalError(f"layer {layer!r}: low-rank factors are not finite (ill-conditioned weights); "
                             "increase damp or use plain SVD")
    return u.float(), v.float()


def _top_factors(a: torch.Tensor, rank: int, svd_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced top-``rank`` factors ``u = U_r S_r^1/2``, ``v = S_r^1/2 V_r^T`` of float64 ``a`` (one decomposition).

    ``svd_dtype=None`` (default): ``eigh`` of the float64 Gram of the smaller side (``a^T a`` or ``a a^T``) and
    ``U_r S_r = a V_r`` (no division by small singular values). On 2 CPU cores this is faster than a float32 SVD of
    ``a`` (one ``min(m, n)^3`` eigh instead of an ``m n min(m, n)`` bidiagonalization) and float64-accurate where it
    matters: squared singular values are exact to ``~1e-16 s_0^2``, so kept values above ``1e-7 s_0`` are exact to
    float32 precision and the product ``u v`` is the truncation up to that (tested against float64 SVD).
    A dtype runs ``torch.linalg.svd`` of ``a`` in it instead.
    """
    if svd_dtype is not None:
        uu, sig, vh = torch.linalg.svd(a.to(svd_dtype), full_matrices=False)
        root = sig[:rank].double().sqrt()
        return uu[:, :rank].double() * root, root[:, None] * vh[:rank].double()
    tall = a.shape[0] >= a.shape[1]
    g = a.T @ a if tall else a @ a.T
    lam, q = torch.linalg.eigh(g)  # ascending
    q = q[:, -rank:].flip(1)
    root = lam[-rank:].flip(0).clamp(min=0).sqrt().sqrt()  # s^1/2
    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    if tall:  # a V_r = U_r S_r
        return (a @ q) * inv, root[:, None] * q.T
    return q * root, inv[:, None] * (q.T @ a)  # U_r^T a = S_r V_r^T


def _diag_weight(w: torch.Tensor | None, n: int, name: str, layer: str) -> torch.Tensor | None:
    if w is None:
        return None
    w = w.detach().to(torch.float64).reshape(-1)
    if w.numel() != n:
        raise CalibrationError(f"layer {layer!r}: {name} has {w.numel()} entries, expected {n}")
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise CalibrationError(f"layer {layer!r}: {name} must be finite and non-negative")
    top = float(w.max())
    if top <= 0:
        raise CalibrationError(f"layer {layer!r}: {name} is all zero (no gradient reached this layer?)")
    return w.clamp(min=WEIGHT_FLOOR * top)


def weighted_error(m: torch.Tensor, approx: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """``sqrt(tr((M - M') H (M - M')^T))`` (the activation-weighted error; Frobenius when ``h`` is None), float64."""
    d = (m.double() - approx.double())
    if h is None:
        return float(d.norm())
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d).clamp(min=0).sqrt())
