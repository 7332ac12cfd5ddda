"""Activation sparsity at run time: WINA (Chen et al., arXiv 2505.19427) and TEAL (Liu et al., 2024) as its baseline.

For ``y = W x`` (``W`` ``[out, in]``), each token keeps only the input coordinates with the largest score and zeroes
the rest: TEAL scores ``|x_i|``; WINA scores ``|x_i| * ||W[:, i]||_2``. If ``W`` has orthogonal columns,
``||W x - W (m * x)||^2 = sum_{dropped i} x_i^2 ||W[:, i]||^2``, so WINA's top-k is the best k-sparse mask.

Transforms (``transform=``), function-preserving rotations of the residual stream (fold the norms, then
:func:`~tensorslim.transforms.rotate.rotate_residual` with one basis per boundary and shortcut matrices):

* ``"k-gate"`` (the WINA release): the attention input in ``V`` of ``W_k = U S V^T``, the MLP input in ``V`` of
  ``W_gate``. Only k_proj and gate_proj become column-orthogonal; q, v and up read the same rotated input.
* ``"stacked"``: ``V`` of the stacked readers of each input, ``[W_q; W_k; W_v]`` and ``[W_gate; W_up]``. The stacked
  matrix becomes column-orthogonal, so with ``criterion="shared"`` (one mask per input, scored by the stacked column
  norms) the top-k is the exact optimum of the summed squared output error of the group.

Criteria (``criterion=``, WINA only): ``"all"`` (each linear its own column norms and mask), ``"kgate"`` (norms on
k_proj and gate_proj only, |x| elsewhere, as the release), ``"shared"`` (one mask per shared input).

Masks: ``mode="topk"`` keeps ``in - floor(s*in)`` coordinates per token (exact sparsity); ``mode="threshold"``
keeps scores above a per-linear threshold calibrated as the ``s``-quantile of the scores on calibration text (TEAL's
deployment mode; sparsity is then only on average, so every module counts what it really dropped:
:func:`realized_sparsity`). ``dense_prefix`` keeps the first fraction of each forward's positions dense (the release
masks only the last 99% of a prefill, for TEAL and WINA alike). Allocation: ``"uniform"`` gives every linear the
target; ``"greedy"`` (TEAL's per-matrix allocation, used by WINA) is :mod:`tensorslim.runtime.act_alloc`.

Measured on SmolLM2-135M (docs/results/sparsity.md): both rotations make WINA *worse*, because the residual stream's
heavy-tailed, axis-aligned activations (which per-token top-k exploits) are mixed by any rotation; the library
default is therefore no transform. The masked product is a dense matmul of the masked input: it measures accuracy,
not speed (a gather-GEMV kernel turns it into speed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapter import ModelAdapter, get_adapter
from ..transforms.fold import fold_norms
from ..transforms.rotate import boundary_count, check_rotatable, rotate_residual

__all__ = ["ActSparseLinear", "apply_activation_sparsity", "realized_sparsity", "reset_counts", "wina_bases"]

logger = logging.getLogger(__name__)

Kind = Literal["wina", "teal"]
Mode = Literal["topk", "threshold"]
Transform = Literal["none", "k-gate", "stacked"]
Criterion = Literal["all", "kgate", "shared"]
Allocation = Literal["uniform", "greedy"]


def _check_sparsity(s: object, what: str = "activation sparsity") -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1), got {s!r}")
    return float(s)


class ActSparseLinear(nn.Module):
    """An ``nn.Linear`` whose input is sparsified per token before the product (see module note).

    Counts the input coordinates it dropped and saw (``dropped``, ``seen``) for :func:`realized_sparsity`.
    """

    def __init__(self, linear: nn.Linear, sparsity: float, *, col_weight: torch.Tensor | None = None,
                 mode: Mode = "topk", threshold: float | None = None, dense_prefix: float = 0.0) -> None:
        super().__init__()
        self.linear = linear
        self.sparsity = _check_sparsity(sparsity)
        if mode not in ("topk", "threshold"):
            raise ConfigError(f"activation sparsity mode must be 'topk' or 'threshold', got {mode!r}")
        if mode == "threshold" and threshold is None:
            raise ConfigError("mode='threshold' needs a calibrated threshold")
        self.mode = mode
        self.threshold = threshold
        self.dense_prefix = _check_sparsity(dense_prefix, "dense_prefix")
        w = torch.ones(linear.in_features) if col_weight is None else col_weight.detach().float().clone()
        self.register_buffer("col_weight", w.to(linear.weight.device), persistent=False)
        self.dropped = 0
        self.seen = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().abs() * self.col_weight

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Keep mask of ``x`` ``[..., in]`` (bool)."""
        s = self.scores(x)
        if self.mode == "threshold":
            keep = s > self.threshold
        else:
            drop = int(self.sparsity * x.shape[-1] + 1e-9)
            if drop == 0:
                return torch.ones_like(s, dtype=torch.bool)
            # the drop-th smallest score per token (kthvalue is ~2x cheaper than topk on CPU); rows where ties at
            # that value would drop more than `drop` (rare with float scores) are redone exactly with topk
            keep = s > torch.kthvalue(s, drop, dim=-1, keepdim=True).values
            bad = (keep.shape[-1] - keep.sum(-1)) != drop
            if bool(bad.any()):
                rows = s[bad]
                idx = torch.topk(rows, drop, dim=-1, largest=False).indices
                keep[bad] = torch.ones_like(rows, dtype=torch.bool).scatter_(-1, idx, False)
        if self.dense_prefix > 0 and x.ndim >= 3:
            n = x.shape[-2]
            keep[..., : n - int((1.0 - self.dense_prefix) * n), :] = True
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsity == 0.0 and self.mode == "topk":
            self.seen += x.numel()
            return self.linear(x)
        keep = self.mask(x)
        self.seen += keep.numel()
        self.dropped += int(keep.numel() - keep.sum().item())
        return self.linear(x * keep.to(x.dtype))

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity:.4f}, mode={self.mode}, dense_prefix={self.dense_prefix}"


def _modules(model: nn.Module) -> list[ActSparseLinear]:
    return [m for m in model.modules() if isinstance(m, ActSparseLinear)]


def reset_counts(model: nn.Module) -> None:
    """Zero the dropped/seen counters of every :class:`ActSparseLinear` in ``model``."""
    for m in _modules(model):
        m.dropped = m.seen = 0


def realized_sparsity(model: nn.Module) -> float:
    """FLOP-weighted fraction of input coordinates dropped since the last :func:`reset_counts`: each dropped input
    of a linear skips ``out_features`` multiply-adds, so this is the fraction of block-linear MACs skipped."""
    num = den = 0.0
    for m in _modules(model):
        num += m.dropped * m.linear.out_features
        den += m.seen * m.linear.out_features
    if den == 0:
        raise ConfigError("realized_sparsity: no ActSparseLinear has run since the counters were reset")
    return num / den


def _svd_v(weights: list[torch.Tensor]) -> torch.Tensor:
    w = torch.cat([t.detach().double().cpu() for t in weights], 0)
    _, _, vh = torch.linalg.svd(w, full_matrices=True)
    return vh.T.contiguous()


@torch.no_grad()
def wina_bases(model: nn.Module, adapter: ModelAdapter, how: Transform = "k-gate") -> list[torch.Tensor]:
    """Per boundary, ``V`` (``[d, d]``, float64) of the SVD of the matrix that reads it; identity for the head input.

    ``how="k-gate"``: ``W_k`` (attention input) and ``W_gate`` (MLP input), as the WINA release.
    ``how="stacked"``: all readers of the input stacked, ``[W_q; W_k; W_v]`` and ``[W_gate; W_up]``.
    """
    check_rotatable(adapter)
    if how not in ("k-gate", "stacked"):
        raise ConfigError(f"WINA transform must be 'none', 'k-gate' or 'stacked', got {how!r}")
    attn, mlp = adapter.linear_groups[0], adapter.linear_groups[2]
    if how == "k-gate":
        attn = (next((n for n in attn if n.endswith("k_proj")), attn[0]),)
        mlp = (mlp[0],)
    qs: list[torch.Tensor] = []
    for block in adapter.get_blocks(model):
        for group in (attn, mlp):
            qs.append(_svd_v([block.get_submodule(n).weight for n in group]))
    qs.append(torch.eye(qs[0].shape[0], dtype=torch.float64))
    assert len(qs) == boundary_count(model, adapter)
    return qs


def _col_weights(block: nn.Module, adapter: ModelAdapter, kind: Kind, criterion: Criterion) -> dict[str, torch.Tensor | None]:
    lins = adapter.block_linears(block)
    if kind == "teal":
        return dict.fromkeys(lins)
    out: dict[str, torch.Tensor | None] = {n: lin.weight.detach().float().norm(dim=0) for n, lin in lins.items()}
    if criterion == "kgate":
        keep = {n for n in adapter.linear_groups[0] if n.endswith("k_proj")} | {adapter.linear_groups[2][0]}
        out = {n: (w if n in keep else None) for n, w in out.items()}
    elif criterion == "shared":
        for group, norm in zip(adapter.linear_groups, adapter.group_norms):
            if norm is None or len(group) < 2:
                continue
            stacked = sum(out[n].pow(2) for n in group).sqrt()  # type: ignore[union-attr]
            for n in group:
                out[n] = stacked
    return out


def _norm_transform(transform: bool | str | None) -> Transform:
    if transform is None or transform is False:
        return "none"
    if transform is True:
        return "k-gate"
    if transform not in ("none", "k-gate", "stacked"):
        raise ConfigError(f"WINA transform must be 'none', 'k-gate' or 'stacked', got {transform!r}")
    return transform  # type: ignore[return-value]


@torch.no_grad()
def _calibrate_thresholds(model: nn.Module, modules: dict[str, ActSparseLinear], batches: torch.Tensor,
                          batch_size: int, max_samples: int = 1 << 20) -> None:
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str):
        def fn(mod: ActSparseLinear, args: tuple) -> None:
            s = mod.scores(args[0]).reshape(-1)
            if s.numel() > max_samples // 8:
                s = s[torch.randperm(s.numel(), generator=gen)[: max_samples // 8].to(s.device)]
            samples[name].append(s.cpu())

        return fn

    from ..calib.runner import forward_with_hooks

    saved = {n: (m.sparsity, m.mode) for n, m in modules.items()}
    try:
        for m in modules.values():
            m.sparsity, m.mode = 0.0, "topk"  # dense while calibrating: thresholds of the unsparsified distribution
        forward_with_hooks(model, batches, batch_size, [(m, hook(n)) for n, m in modules.items()])
    finally:
        for n, m in modules.items():
            m.sparsity = saved[n][0]
    for n, m in modules.items():
        s = torch.cat(samples[n])[:max_samples]
        m.threshold = float(torch.quantile(s.double(), m.sparsity)) if m.sparsity > 0 else -1.0
        m.mode = "threshold"
    reset_counts(model)


@torch.no_grad()
def apply_activation_sparsity(model: nn.Module, adapter: ModelAdapter | None, calib_batches: torch.Tensor | None,
                              sparsity: float, kind: Kind = "wina", *, mode: Mode = "topk",
                              allocation: Allocation | Mapping[str, float] = "uniform", batch_size: int = 4,
                              transform: bool | Transform | None = None, criterion: Criterion = "all",
                              weighted: Criterion | None = None, dense_prefix: float = 0.0,
                              alloc_kwargs: Mapping[str, object] | None = None) -> nn.Module:
    """Wrap every block linear in an :class:`ActSparseLinear` (in place; returns ``model``).

    ``kind="wina"``: scores ``|x| * column norms`` (``criterion``, optionally after ``transform``); ``kind="teal"``:
    ``|x|``. ``mode="threshold"`` and ``allocation="greedy"`` calibrate on ``calib_batches`` (LongTensor
    ``[n, seq]``); ``allocation`` may also be a ready ``{full linear name: sparsity}`` map. ``weighted`` is the old
    name of ``criterion``. ``transform`` defaults to ``"none"`` (see the module note for why).
    """
    sparsity = _check_sparsity(sparsity)
    criterion = weighted if weighted is not None else criterion
    if kind not in ("wina", "teal"):
        raise ConfigError(f"activation sparsity kind must be 'wina' or 'teal', got {kind!r}")
    if mode not in ("topk", "threshold"):
        raise ConfigError(f"activation sparsity mode must be 'topk' or 'threshold', got {mode!r}")
    if criterion not in ("all", "kgate", "shared"):
        raise ConfigError(f"WINA criterion must be 'all', 'kgate' or 'shared', got {criterion!r}")
    if not isinstance(allocation, Mapping) and allocation not in ("uniform", "greedy"):
        raise ConfigError(f"activation sparsity allocation must be 'uniform', 'greedy' or a mapping, got {allocation!r}")
    needs_data = mode == "threshold" or allocation == "greedy"
    if needs_data and (calib_batches is None or calib_batches.numel() == 0):
        raise ConfigError(f"mode={mode!r} / allocation={allocation!r} needs calibration batches")
    tf = _norm_transform(transform)
    adapter = adapter or get_adapter(model)
    if isinstance(allocation, Mapping):  # checked before anything is rewritten
        names = {f"{adapter.blocks}.{i}.{n}" for i in range(len(adapter.get_blocks(model)))
                 for g in adapter.linear_groups for n in g}
        unknown = set(allocation) - names
        if unknown:
            raise ConfigError(f"allocation names linears this model does not have: {sorted(unknown)[:5]}")
        for name, s in allocation.items():
            _check_sparsity(s, f"allocated sparsity of {name}")
    if tf != "none":
        check_rotatable(adapter)
        fold_norms(model, adapter)
        rotate_residual(model, adapter, wina_bases(model, adapter, tf))
    wrapped: dict[str, ActSparseLinear] = {}
    for i, block in enumerate(adapter.get_blocks(model)):
        weights = _col_weights(block, adapter, kind, criterion)
        for name, lin in adapter.block_linears(block).items():
            mod = ActSparseLinear(lin, sparsity, col_weight=weights[name], dense_prefix=dense_prefix)
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, mod)
            wrapped[f"{adapter.blocks}.{i}.{name}"] = mod
    if allocation == "greedy":
        from .act_alloc import greedy_allocation

        allocation = greedy_allocation(model, adapter, calib_batches, [sparsity], batch_size=batch_size,
                                       **dict(alloc_kwargs or {}))[sparsity]  # type: ignore[arg-type]
    if isinstance(allocation, Mapping):
        for name, s in allocation.items():
            wrapped[name].sparsity = float(s)
    if mode == "threshold":
        _calibrate_thresholds(model, wrapped, calib_batches, batch_size)  # type: ignore[arg-type]
    logger.info("%s activation sparsity %.2f (%s, %s) on %d linears", kind, sparsity, mode,
                "uniform" if allocation == "uniform" else "allocated", len(wrapped))
    return model
