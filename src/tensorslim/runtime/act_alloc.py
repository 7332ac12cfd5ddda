"""Per-matrix activation-sparsity allocation: TEAL's greedy (Liu et al., 2024), which WINA uses unchanged.

Within each block, the seven linears (q, k, v, o, gate, up, down) get different sparsities whose parameter-weighted
mean is the target ``s``: ``sum_p n_p s_p / sum_p n_p = s`` (``n_p`` = weight count, so this is the fraction of the
block's multiply-adds skipped). Every block gets the same target, as in TEAL.

How (one calibration pass, all targets at once):

1. Block-by-block on the *dense* model (inputs captured with the runner's
   :func:`~tensorslim.calib.runner.capture_block_inputs`, then propagated through the dense blocks): for each linear
   ``p`` and each grid level ``g`` (default 0.1, 0.2, ..., 0.9), sparsify ``p`` alone at ``g`` and record the squared
   error of the block's output, ``e_p(g) = sum ||block(x) - block_dense(x)||^2``.
2. Greedy on those curves (piecewise linear between grid points): repeatedly advance the linear whose next grid step
   costs the least error per unit of weighted sparsity, until the weighted mean reaches the target; the last step is
   taken fractionally so the target is met exactly.

Deviation from TEAL/WINA's ``greedyopt.py``: the release re-measures the *joint* block error of every candidate at
every step (hundreds of block forwards per step); here each linear's error curve is measured alone and the errors
are treated as additive, which needs ``7 x len(grid)`` block forwards per block and serves every target. The release
steps by 0.025 / weight; here the grid is coarser and interpolated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapter import ModelAdapter

__all__ = ["allocate_block", "error_curves", "greedy_allocation"]

logger = logging.getLogger(__name__)

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _names(adapter: ModelAdapter) -> list[str]:
    return [n for group in adapter.linear_groups for n in group]


def _run(block: nn.Module, cached) -> torch.Tensor:  # noqa: ANN001 - the runner's cached inputs
    out = block(cached.hidden, **cached.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def error_curves(model: nn.Module, adapter: ModelAdapter, calib_batches: torch.Tensor, *,
                 grid: Sequence[float] = DEFAULT_GRID, batch_size: int = 4) -> list[dict[str, list[float]]]:
    """Per block, per linear (relative name): the block-output squared error with that linear alone sparsified at
    each ``grid`` level (``grid[0]`` must be 0). The linears must already be wrapped in ``ActSparseLinear``; their
    sparsity, mode and counters are restored afterwards."""
    from ..calib.runner import capture_block_inputs
    from .wina import ActSparseLinear

    grid = [float(g) for g in grid]
    if not grid or grid[0] != 0.0 or any(b <= a for a, b in zip(grid, grid[1:])) or grid[-1] >= 1.0:
        raise ConfigError(f"allocation grid must start at 0 and increase strictly below 1, got {grid}")
    device = next(model.parameters()).device
    cached = capture_block_inputs(model, adapter, calib_batches, batch_size=batch_size, device=device)
    curves: list[dict[str, list[float]]] = []
    for i, block in enumerate(adapter.get_blocks(model)):
        mods = {n: block.get_submodule(n) for n in _names(adapter)}
        if not all(isinstance(m, ActSparseLinear) for m in mods.values()):
            raise ConfigError("error_curves: wrap the block linears in ActSparseLinear first")
        saved = {n: (m.sparsity, m.mode, m.dropped, m.seen) for n, m in mods.items()}
        try:
            for m in mods.values():
                m.sparsity, m.mode = 0.0, "topk"
            targets = [_run(block, c) for c in cached]
            per: dict[str, list[float]] = {}
            for n, m in mods.items():
                errs = [0.0]
                for g in grid[1:]:
                    m.sparsity = g
                    errs.append(sum(float((_run(block, c) - t).double().pow(2).sum()) for c, t in zip(cached, targets)))
                m.sparsity = 0.0
                per[n] = errs
        finally:
            for n, m in mods.items():
                m.sparsity, m.mode, m.dropped, m.seen = saved[n]
        curves.append(per)
        for c, t in zip(cached, targets):
            c.hidden = t
        logger.debug("block %d error curves done", i)
    return curves


def allocate_block(curves: dict[str, list[float]], grid: Sequence[float], sizes: dict[str, int],
                   target: float) -> dict[str, float]:
    """Greedy per-matrix sparsities of one block whose size-weighted mean is exactly ``target`` (see module note)."""
    grid = [float(g) for g in grid]
    if not 0.0 <= target <= grid[-1]:
        raise ConfigError(f"allocation target {target} is outside [0, {grid[-1]}] (the top of the grid)")
    total = float(sum(sizes.values()))
    pos = dict.fromkeys(curves, 0)
    alloc = dict.fromkeys(curves, 0.0)
    reached = 0.0
    while reached < target - 1e-12:
        best, best_cost = None, float("inf")
        for n, e in curves.items():
            j = pos[n]
            if j + 1 < len(grid):
                cost = (e[j + 1] - e[j]) / (sizes[n] * (grid[j + 1] - grid[j]))
                if cost < best_cost:
                    best, best_cost = n, cost
        assert best is not None  # target <= grid[-1] guarantees a step remains
        j = pos[best]
        gain = sizes[best] * (grid[j + 1] - grid[j]) / total
        if reached + gain >= target - 1e-12:
            step = (target - reached) / gain * (grid[j + 1] - grid[j])  # rounding can overshoot grid[j + 1]
            alloc[best] = min(grid[j + 1], grid[j] + step)
            break
        pos[best] = j + 1
        alloc[best] = grid[j + 1]
        reached += gain
    return alloc


def greedy_allocation(model: nn.Module, adapter: ModelAdapter, calib_batches: torch.Tensor, targets: Sequence[float],
                      *, grid: Sequence[float] = DEFAULT_GRID, batch_size: int = 4,
                      curves: list[dict[str, list[float]]] | None = None) -> dict[float, dict[str, float]]:
    """``{target: {full linear name: sparsity}}`` for every target, from one set of :func:`error_curves` (or the
    ``curves`` given)."""
    if curves is None:
        curves = error_curves(model, adapter, calib_batches, grid=grid, batch_size=batch_size)
    blocks = adapter.get_blocks(model)
    if len(curves) != len(blocks):
        raise ConfigError(f"got error curves for {len(curves)} blocks; the model has {len(blocks)}")
    out: dict[float, dict[str, float]] = {}
    for t in targets:
        alloc: dict[str, float] = {}
        for i, (block, per) in enumerate(zip(blocks, curves)):
            sizes = {n: block.get_submodule(n).weight.numel() for n in per}
            for n, s in allocate_block(per, grid, sizes, float(t)).items():
                alloc[f"{adapter.blocks}.{i}.{n}"] = s
        out[float(t)] = alloc
    return out
