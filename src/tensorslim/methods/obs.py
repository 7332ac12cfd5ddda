"""The OBS column loop shared by GPTQ (quantization) and SparseGPT (pruning).

Paper: Frantar & Alistarh, "Optimal Brain Compression" / "GPTQ" (arXiv 2210.17323), and SparseGPT (2301.00774);
reference code IST-DASLab/gptq (``gptq.py``, ~170 lines). Objective, per output row ``w``:
``min_q (w - q) H (w - q)^T`` with ``H = X^T X`` (any positive scale). Columns are fixed one at a time in a solve
order; after column ``j`` is replaced by its projection ``q_j``, the error ``e_j = (w_j - q_j) / U_jj`` is spread
over the columns not yet fixed, ``w_{j+1:} -= e_j U_{j, j+1:}``, where ``U`` is the upper Cholesky factor of
``H^{-1}`` (``H^{-1} = U^T U``). Updates inside a block of ``block_size`` columns are applied column by column; the
rest of the matrix receives one GEMM per block ("lazy batch updates"). With ``H`` diagonal, no error moves and the
loop is plain projection (GPTQ == RTN).

Conventions (as in the reference): dead inputs (``H_jj == 0``, the input is always zero) get ``H_jj = 1`` and their
weight column is zeroed; damping adds ``damp * mean(diag H)`` to the diagonal. If the Cholesky factorization fails
the damping is multiplied by 10 (up to 5 times) and a warning is logged; after that a NumericalError names the layer.

What a *projection* is: ``project(block, i, start, hinv_diag) -> column`` where ``block`` is the current ``[out, k]``
block in solve order (columns ``< i`` already final, columns ``>= i`` carry every update so far), ``i`` the column
inside the block, ``start`` the solve-order index of ``block[:, 0]`` and ``hinv_diag`` the ``[k]`` diagonal of ``U``
for the block (SparseGPT's saliency ``w^2 / U_jj^2`` needs it). It returns the replacement of ``block[:, i]``
(``[out]``) and may keep its own per-solve state (codes, masks). It must not modify ``block``.

Limits: float32 throughout (as the reference; float64 on request via ``dtype``); memory ``O(in^2 + out * in)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from ..errors import CalibrationError, ConfigError, NumericalError

log = logging.getLogger(__name__)

Projector = Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObsResult:
    q: torch.Tensor  # [out, in] projected matrix, original column order
    dead: torch.Tensor  # bool [in]: inputs whose H_jj was 0 (weights zeroed before the solve)
    order: torch.Tensor | None  # the solve order used (None: natural order)
    damp: float  # the damping fraction finally used


def act_order(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: columns by descending ``diag(H)`` (stable, so ties keep their natural order)."""
    return torch.argsort(hessian.diagonal(), descending=True, stable=True)


def check_hessian(hessian: torch.Tensor, in_features: int, layer: str) -> None:
    if hessian.ndim != 2 or tuple(hessian.shape) != (in_features, in_features):
        raise CalibrationError(
            f"layer {layer!r}: Hessian has shape {tuple(hessian.shape)}, expected ({in_features}, {in_features})"
        )
    if not torch.isfinite(hessian).all():
        raise CalibrationError(
            f"layer {layer!r}: the Hessian (X^T X) has NaN/Inf entries; the calibration activations overflowed "
            "(use float32 and check the layers compressed before this one)"
        )


def prepare(w: torch.Tensor, hessian: torch.Tensor, *, layer: str = "<layer>",
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of ``w`` and ``H`` in ``dtype`` with dead inputs handled; returns ``(w, H, dead)``. No damping."""
    check_hessian(hessian, w.shape[1], layer)
    h = hessian.to(device=w.device, dtype=dtype, copy=True)
    w = w.to(dtype=dtype, copy=True)
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h.diagonal()[dead] = 1.0
        w[:, dead] = 0.0
    return w, h, dead


def inverse_cholesky(h: torch.Tensor, damp: float, *, layer: str = "<layer>", retries: int = 5) -> tuple[torch.Tensor, float]:
    """Upper ``U`` with ``(H + damp*mean(diag H) I)^{-1} = U^T U``; raises the damping on failure. Returns (U, damp)."""
    if not damp >= 0:
        raise ConfigError(f"damp must be >= 0, got {damp!r}")
    mean_diag = float(h.diagonal().mean())
    eye = torch.arange(h.shape[0], device=h.device)
    for attempt in range(retries + 1):
        hd = h.clone()
        hd[eye, eye] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            # H^{-1} = L^{-T} L^{-1}; a triangular solve is far faster than cholesky_inverse on CPU.
            linv = torch.linalg.solve_triangular(lower, torch.eye(h.shape[0], dtype=h.dtype, device=h.device), upper=False)
            hinv = linv.T @ linv
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        new = damp * 10 if damp > 0 else 1e-4
        if attempt < retries:
            log.warning("layer %r: Hessian not positive definite with damp=%g; retrying with %g", layer, damp, new)
            damp = new
    raise NumericalError(
        f"layer {layer!r}: Hessian is not positive definite even with damp={damp:g}; use more calibration data "
        "or a larger damp"
    )


def obs_solve(
    w: torch.Tensor,
    hessian: torch.Tensor,
    project: Projector,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    order: torch.Tensor | None = None,
    layer: str = "<layer>",
    dtype: torch.dtype = torch.float32,
    sync: int = 16,
    fused: bool | None = None,
) -> ObsResult:
    """Run the OBS column loop on ``w [out, in]`` with ``H [in, in]``; see the module note for ``project``.

    ``order`` is the solve order (a permutation of the inputs, e.g. :func:`act_order`); the projector sees columns
    in that order and ``start + i`` is a solve-order index. Inputs are not modified. Column ``i`` is fully updated
    when projected; the whole block is fully updated whenever ``i`` is a multiple of ``sync`` (so a projector that
    looks ahead, e.g. to fit a group or choose an N:M mask, must do so at such columns: pass a ``sync`` dividing
    its group size).

    ``fused``: a projector with a ``block(b, u1, start)`` method (GPTQ's) may process a whole block in one fused
    kernel; it returns ``(q, err)`` (both ``[k, out]``, one row per column) or ``None`` to use the loop here.
    ``None`` (default): fused on CUDA tensors only; ``True``: whenever the projector offers it (tests use this with
    Triton's CPU interpreter); ``False``: never.
    """
    if block_size < 1 or sync < 1:
        raise ConfigError(f"block_size and sync must be >= 1, got {block_size!r}, {sync!r}")
    out, inp = w.shape
    wk, h, dead = prepare(w, hessian, layer=layer, dtype=dtype)
    if order is not None:
        order = order.to(device=wk.device, dtype=torch.long)
        if order.shape != (inp,) or not torch.equal(torch.sort(order).values, torch.arange(inp, device=wk.device)):
            raise ConfigError(f"layer {layer!r}: order must be a permutation of 0..{inp - 1}")
        wk = wk[:, order]
        h = h[order][:, order]
    u, damp_used = inverse_cholesky(h, damp, layer=layer)
    del h
    # Work on W^T (one contiguous row per input column): the rank-1 updates then touch contiguous memory, ~10x
    # faster on CPU than updating strided columns. The projector still sees an [out, k] (transposed) view.
    wt = wk.T.contiguous()
    del wk
    qt = torch.empty_like(wt)
    use_fused = (wt.is_cuda if fused is None else fused) and dtype == torch.float32
    block_fn = getattr(project, "block", None) if use_fused else None
    for i1 in range(0, inp, block_size):
        i2 = min(i1 + block_size, inp)
        k = i2 - i1
        b = wt[i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        done = block_fn(b, u1.contiguous(), i1) if block_fn is not None else None
        if done is not None:
            qt[i1:i2], err = done
            if i2 < inp:
                wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
            continue
        diag = u1.diagonal().clone()
        err = torch.empty_like(b)
        view = b.T
        # Two-level blocking: rank-1 updates stay inside a sub-block of `sync` columns (small enough that torch runs
        # them on one thread; on a busy CPU, multi-threaded tiny ops are >10x slower), one GEMM per sub-block.
        for s0 in range(0, k, sync):
            s1 = min(s0 + sync, k)
            for i in range(s0, s1):
                qi = project(view, i, i1, diag)
                qt[i1 + i] = qi
                torch.sub(b[i], qi, out=err[i])
                err[i].div_(diag[i])
                if i + 1 < s1:
                    b[i + 1:s1].addr_(u1[i, i + 1:s1], err[i], alpha=-1.0)
            if s1 < k:
                b[s1:].addmm_(u1[s0:s1, s1:].T, err[s0:s1], alpha=-1.0)
        if i2 < inp:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
    q = qt.T
    if order is not None:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(inp, device=order.device)
        q = q[:, inv]
    if not bool(torch.isfinite(q).all()):
        raise NumericalError(f"layer {layer!r}: the OBS solve produced non-finite values")
    return ObsResult(q=q.float(), dead=dead, order=order, damp=damp_used)


def layer_objective(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` in float64 (the quantity every solver here minimizes)."""
    d = (w.double() - w_hat.double())
    return float(((d @ hessian.double()) * d).sum())
