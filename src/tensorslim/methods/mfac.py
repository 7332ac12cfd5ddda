"""M-FAC saliency: pruning by an inverse empirical Fisher built from ``m`` gradients (Frantar, Kurtic, Alistarh,
"M-FAC: Efficient Matrix-Free Approximations of Second-Order Information", NeurIPS 2021; IST-DASLab/M-FAC).

Per block of ``B`` consecutive weights of the row-major flattened matrix (blocked M-FAC, ``B=128`` default) with
gradients ``G`` ``[m, B]``: ``F = lambda I + (1/m) G^T G``. M-FAC applies ``F^{-1}`` by a Sherman-Morrison recursion;
we use the identical closed form (Woodbury) ``F^{-1} = (1/lambda) (I - G^T K^{-1} G)`` with the ``m x m`` matrix
``K = m lambda I + G G^T``, batched over blocks (same ``O(B m^2 + m^3)`` cost per block), so
``diag(F^{-1})_q = (1 - g_q^T K^{-1} g_q) / lambda``. Saliency ``rho_q = w_q^2 / (2 [F^{-1}]_qq)``; the lowest are
pruned (by the format's rule: unstructured per matrix, N:M per group, whole groups), then the kept weights get the
OBS update ``w <- w - F^{-1} sum_{q pruned} (w_q / [F^{-1}]_qq) e_q`` (a sum of single-weight OBS steps, as the
reference) and the pruned ones are set to exactly 0. Survivors in an inner format are rounded (RTN).
Gradients come from :func:`tensorslim.calib.gradients.collect_gradients` (one LM-loss backward per calibration
sequence); bind them with :meth:`MFAC.with_gradients` (``prepare_mfac`` does it for a whole assignment).
Limits: one-shot (the reference recomputes gradients 16 times while pruning gradually); ``m * out * in`` floats of
gradient memory per layer; ``B`` must divide ``out * in`` (and be a multiple of ``m`` of N:M / the group size).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import CalibrationError, ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.sparse import GroupSparse, Sparse
from ..stats import LayerStats
from .base import Method
from .prune import encode_mask, select_mask

__all__ = ["MFAC", "fisher_inverse_diag", "fisher_inverse_apply", "mfac_prune"]


def _blocks(grads: torch.Tensor, block: int) -> torch.Tensor:
    m = grads.shape[0]
    d = grads[0].numel()
    if d % block:
        raise ConfigError(f"M-FAC block size {block} does not divide the {d} weights of the layer; use a divisor")
    return grads.reshape(m, d // block, block).permute(1, 0, 2).double()  # [nb, m, B]


def _kinv(g: torch.Tensor, damp: float) -> torch.Tensor:
    m = g.shape[1]
    k = g @ g.transpose(1, 2)
    k.diagonal(dim1=1, dim2=2).add_(m * damp)
    return torch.linalg.inv(k)  # [nb, m, m], symmetric positive definite


def fisher_inverse_diag(g: torch.Tensor, damp: float) -> torch.Tensor:
    """``diag(F^{-1})`` per block, ``[nb, B]``, for block gradients ``g`` ``[nb, m, B]``."""
    kinv = _kinv(g, damp)
    return (1.0 - ((kinv @ g) * g).sum(1)) / damp


def fisher_inverse_apply(g: torch.Tensor, x: torch.Tensor, damp: float, kinv: torch.Tensor | None = None) -> torch.Tensor:
    """``F^{-1} x`` per block (``x`` ``[nb, B]``)."""
    kinv = _kinv(g, damp) if kinv is None else kinv
    gx = (g @ x.unsqueeze(-1))  # [nb, m, 1]
    return (x - (g.transpose(1, 2) @ (kinv @ gx)).squeeze(-1)) / damp


def mfac_prune(w: torch.Tensor, grads: torch.Tensor, fmt: Sparse | GroupSparse, *, damp: float = 1e-5,
               block: int = 128, update: bool = True) -> CompressedWeight:
    """Prune ``w`` ``[out, in]`` with M-FAC saliency from ``grads`` ``[m, out, in]`` (module note)."""
    out, inp = w.shape
    if grads.ndim != 3 or tuple(grads.shape[1:]) != (out, inp) or grads.shape[0] < 1:
        raise CalibrationError(f"M-FAC gradients must be [m, {out}, {inp}], got {tuple(grads.shape)}")
    g = _blocks(grads, block)
    kinv = _kinv(g, damp)
    hdiag = (1.0 - ((kinv @ g) * g).sum(1)) / damp  # [nb, B]
    wb = w.double().reshape(-1, block)
    sal = wb.pow(2) / (2 * hdiag)
    keep = select_mask(sal.reshape(out, inp).float(), fmt, scope="layer")
    if isinstance(fmt, GroupSparse):
        keep_w = keep.repeat_interleave(fmt.group_size, 1)
    else:
        keep_w = keep
    new = wb
    if update:
        pruned = ~keep_w.reshape(-1, block)
        x = torch.where(pruned, wb / hdiag, torch.zeros_like(wb))
        new = wb - fisher_inverse_apply(g, x, damp, kinv)
    new = (new.reshape(out, inp) * keep_w).float()
    return encode_mask(fmt, new, keep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MFAC(Method):
    """``MFAC(format=Sparse(sparsity=0.5), damp=1e-5, block=128)``, bound to gradients by :meth:`with_gradients`."""

    name: ClassVar[str] = "mfac"
    format_types: ClassVar[tuple[type, ...]] = (Sparse, GroupSparse)

    damp: float = 1e-5
    block: int = 128
    update: bool = True
    gradients: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ConfigError(f"MFAC.damp must be > 0, got {self.damp!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ConfigError(f"MFAC.block must be a positive integer, got {self.block!r}")

    def with_gradients(self, grads: torch.Tensor) -> "MFAC":
        return dataclasses.replace(self, gradients=grads)

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        if self.gradients is None:
            raise CalibrationError(
                f"method 'mfac' needs per-sequence gradients for layer {layer!r}; run "
                "tensorslim.calib.gradients.prepare_mfac(model, assign, batches) before the runner"
            )
        return mfac_prune(w.float(), self.gradients.to(w.device), self.format,  # type: ignore[arg-type]
                          damp=self.damp, block=self.block, update=self.update)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("gradients", None)
        return d
