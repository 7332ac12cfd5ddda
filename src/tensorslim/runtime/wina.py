"""Activation sparsity at run time: WINA (Chen et al., arXiv 2505.19427) and TEAL (Liu et al., 2024) as its baseline.

For ``y = W x`` (``W`` ``[out, in]``), each token keeps only the input coordinates with the largest score and zeroes
the rest: TEAL scores ``|x_i|``; WINA scores ``|x_i| * ||W[:, i]||_2``. If ``W`` has orthogonal columns,
``||W x - W (m * x)||^2 = sum_{dropped i} x_i^2 ||W[:, i]||^2``, so WINA's top-k is the best k-sparse mask. WINA makes
that hold (approximately) with a function-preserving transform: fold the norms, then rotate the residual stream at
block ``i``'s attention input by ``V`` of ``W_k = U S V^T`` and at its MLP input by ``V`` of ``W_gate``
(:func:`~tensorslim.transforms.rotate.rotate_residual`, with shortcut matrices), so ``W_k Q`` and ``W_gate Q`` have
orthogonal columns; the other readers share the rotated input.

Masks: ``mode="topk"`` keeps exactly ``in - floor(s*in)`` coordinates per token (exact sparsity, the WINA paper's
evaluation); ``mode="threshold"`` keeps scores above a per-linear threshold calibrated as the ``s``-quantile of the
calibration scores (TEAL's deployment mode; sparsity is then only on average). Allocation: ``"uniform"`` gives every
linear the target. Differences from the released WINA code: the column-norm weighting is used on every linear (the
release weights only k_proj and gate_proj and uses |x| elsewhere); all tokens are sparsified (the release keeps the
first 1% of prefill dense); no greedy per-matrix allocation yet. The masked product here is a dense matmul of the
masked input: it measures accuracy, not speed (a gather-GEMV kernel is what turns it into speed).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapter import ModelAdapter, get_adapter
from ..transforms.fold import fold_norms
from ..transforms.rotate import boundary_count, check_rotatable, rotate_residual

__all__ = ["ActSparseLinear", "apply_activation_sparsity", "wina_bases"]

logger = logging.getLogger(__name__)

Kind = Literal["wina", "teal"]
Mode = Literal["topk", "threshold"]


def _check_sparsity(s: object) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise ConfigError(f"activation sparsity must be a number in [0, 1), got {s!r}")
    return float(s)


class ActSparseLinear(nn.Module):
    """An ``nn.Linear`` whose input is sparsified per token before the product (see module note)."""

    def __init__(self, linear: nn.Linear, sparsity: float, *, col_weight: torch.Tensor | None = None,
                 mode: Mode = "topk", threshold: float | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.sparsity = _check_sparsity(sparsity)
        if mode not in ("topk", "threshold"):
            raise ConfigError(f"activation sparsity mode must be 'topk' or 'threshold', got {mode!r}")
        if mode == "threshold" and threshold is None:
            raise ConfigError("mode='threshold' needs a calibrated threshold")
        self.mode = mode
        self.threshold = threshold
        w = torch.ones(linear.in_features) if col_weight is None else col_weight.detach().float().clone()
        self.register_buffer("col_weight", w.to(linear.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().abs() * self.col_weight

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Keep mask of ``x`` ``[..., in]`` (bool)."""
        s = self.scores(x)
        if self.mode == "threshold":
            return s > self.threshold
        drop = int(self.sparsity * x.shape[-1] + 1e-9)
        if drop == 0:
            return torch.ones_like(s, dtype=torch.bool)
        idx = torch.topk(s, drop, dim=-1, largest=False).indices
        return torch.ones_like(s, dtype=torch.bool).scatter_(-1, idx, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsity == 0.0:
            return self.linear(x)
        return self.linear(x * self.mask(x).to(x.dtype))

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, mode={self.mode}"


@torch.no_grad()
def wina_bases(model: nn.Module, adapter: ModelAdapter) -> list[torch.Tensor]:
    """Per boundary, ``V`` (``[d, d]``, float64) of the SVD of the matrix that reads it: ``W_k`` for the attention
    input, ``W_gate`` (first linear of the MLP group) for the MLP input; identity for the head input."""
    check_rotatable(adapter)
    k_name = next((n for n in adapter.linear_groups[0] if n.endswith("k_proj")), adapter.linear_groups[0][0])
    gate = adapter.linear_groups[2][0]
    qs: list[torch.Tensor] = []
    for block in adapter.get_blocks(model):
        for name in (k_name, gate):
            w = block.get_submodule(name).weight.detach().double().cpu()
            _, _, vh = torch.linalg.svd(w, full_matrices=True)
            qs.append(vh.T.contiguous())
    d = qs[0].shape[0]
    qs.append(torch.eye(d, dtype=torch.float64))
    assert len(qs) == boundary_count(model, adapter)
    return qs


@torch.no_grad()
def _calibrate_thresholds(model: nn.Module, modules: dict[str, ActSparseLinear], batches: torch.Tensor,
                          batch_size: int, max_samples: int = 1 << 20) -> None:
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in modules}

    def hook(name: str):
        def fn(mod: ActSparseLinear, args: tuple) -> None:
            s = mod.scores(args[0]).reshape(-1)
            if s.numel() > max_samples // 8:
                s = s[torch.randperm(s.numel(), generator=torch.Generator().manual_seed(0))[: max_samples // 8]]
            samples[name].append(s.cpu())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    saved = {n: m.sparsity for n, m in modules.items()}
    try:
        for m in modules.values():
            m.sparsity = 0.0  # dense while calibrating: thresholds of the unsparsified distribution, as TEAL
        dev = next(model.parameters()).device
        for i in range(0, batches.shape[0], batch_size):
            model(batches[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for n, m in modules.items():
            m.sparsity = saved[n]
    for n, m in modules.items():
        s = torch.cat(samples[n])
        if s.numel() > max_samples:
            s = s[:max_samples]
        m.threshold = float(torch.quantile(s.double(), m.sparsity)) if m.sparsity > 0 else -1.0
        m.mode = "threshold"


@torch.no_grad()
def apply_activation_sparsity(model: nn.Module, adapter: ModelAdapter | None, calib_batches: torch.Tensor | None,
                              sparsity: float, kind: Kind = "wina", *, mode: Mode = "topk",
                              allocation: Literal["uniform"] = "uniform", batch_size: int = 4,
                              transform: bool | None = None, weighted: Literal["all", "kgate"] = "all") -> nn.Module:
    """Wrap every block linear in an :class:`ActSparseLinear` (in place; returns ``model``).

    ``kind="wina"``: scores ``|x| * column norms`` (optionally after the SVD rotation); ``kind="teal"``: scores ``|x|``.
    ``mode="topk"`` needs no calibration data; ``mode="threshold"`` calibrates per-linear thresholds on
    ``calib_batches`` (LongTensor ``[n, seq]``). WINA options: ``transform`` (default False; True folds the norms and
    rotates the residual stream by the SVD bases, which measured worse on SmolLM2-135M, see docs/results/sparsity.md) and ``weighted`` (``"all"``: column norms on every linear; ``"kgate"``: only on
    k_proj and the MLP's gate, |x| elsewhere, as the released WINA code).
    """
    sparsity = _check_sparsity(sparsity)
    if kind not in ("wina", "teal"):
        raise ConfigError(f"activation sparsity kind must be 'wina' or 'teal', got {kind!r}")
    if allocation != "uniform":
        raise ConfigError(f"activation sparsity allocation {allocation!r} is not implemented; use 'uniform'")
    if mode not in ("topk", "threshold"):
        raise ConfigError(f"activation sparsity mode must be 'topk' or 'threshold', got {mode!r}")
    if mode == "threshold" and (calib_batches is None or calib_batches.numel() == 0):
        raise ConfigError("mode='threshold' needs calibration batches to set the thresholds")
    if weighted not in ("all", "kgate"):
        raise ConfigError(f"WINA weighted must be 'all' or 'kgate', got {weighted!r}")
    adapter = adapter or get_adapter(model)
    transform = False if transform is None else bool(transform)  # measured: the SVD rotation hurts SmolLM2 (docs)
    if transform:
        check_rotatable(adapter)
        fold_norms(model, adapter)
        rotate_residual(model, adapter, wina_bases(model, adapter))
    wrapped: dict[str, ActSparseLinear] = {}
    for i, block in enumerate(adapter.get_blocks(model)):
        for name, lin in adapter.block_linears(block).items():
            use = kind == "wina" and (weighted == "all" or name.endswith("k_proj") or name == adapter.linear_groups[2][0])
            cw = lin.weight.detach().float().norm(dim=0) if use else None
            mod = ActSparseLinear(lin, sparsity, col_weight=cw, mode="topk")
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, mod)
            wrapped[f"{adapter.blocks}.{i}.{name}"] = mod
    if mode == "threshold":
        _calibrate_thresholds(model, wrapped, calib_batches, batch_size)  # type: ignore[arg-type]
    logger.info("%s activation sparsity %.2f (%s) on %d linears", kind, sparsity, mode, len(wrapped))
    return model
