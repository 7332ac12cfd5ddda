"""The gradient-statistic pass (empirical Fisher diagonal for FWSVD) and the pre-pass that resolves global methods.

Empirical Fisher (Hsu et al., ICLR 2022, FWSVD): ``F_ij = sum_b (dL_b / dW_ij)^2`` over calibration sequences ``b``
with ``L_b`` the causal-LM loss of one sequence (one backward per sequence: per-sample squared gradients, not the
square of a batch mean). Memory bound: gradients are enabled only on the requested linear weights (every other
parameter keeps ``requires_grad=False``, so no embedding/norm gradients are kept), and with ``reduce="in"|"out"``
each step folds the squared gradient into an ``[in]`` or ``[out]`` vector and drops it; ``reduce="none"`` keeps full
``[out, in]`` float32 sums (one copy of the targeted weights). Activations for one sequence are the other cost.
The model's ``requires_grad`` flags and ``.grad`` fields are restored/cleared afterwards; the weights are untouched.

:func:`prepare_assign` is the one pre-pass the runner calls before its block loop, on the still-dense model:
methods with ``resolve(weights)`` (global rank allocation: ``welore``) become per-layer fixed-rank copies (or
``None`` = keep dense), and methods with ``with_fisher`` (``fwsvd``) get their layer's Fisher. Other methods pass
through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from ..errors import CalibrationError

logger = logging.getLogger(__name__)

Reduce = Literal["none", "in", "out"]


def fisher_diagonal(
    model: nn.Module,
    batches: torch.Tensor,
    names: Iterable[str],
    *,
    reduce: Reduce = "in",
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Summed squared LM-loss gradients of the weights of the linears ``names`` over the sequences of ``batches``.

    ``batches``: ``[n, seq]`` token ids (a causal LM: the model must accept ``labels=``). ``reduce="in"`` sums over
    output rows (one value per input column, ``[in]``), ``"out"`` over input columns (``[out]``), ``"none"`` keeps
    ``[out, in]``. Returns float32 tensors on the CPU.
    """
    if reduce not in ("none", "in", "out"):
        raise CalibrationError(f"reduce must be 'none', 'in' or 'out', got {reduce!r}")
    from .gradients import per_sequence_gradients

    sums: dict[str, torch.Tensor] = {}
    for _, grads in per_sequence_gradients(model, batches, list(names), device=device, what="the Fisher pass"):
        for n, g in grads.items():
            g2 = g.float().square()
            g2 = g2.sum(0) if reduce == "in" else g2.sum(1) if reduce == "out" else g2
            sums[n] = sums[n] + g2 if n in sums else g2.clone()
    return {n: t.cpu() for n, t in sums.items()}


def prepare_assign(
    model: nn.Module,
    adapter,
    assign: Mapping[str, object],
    batches: torch.Tensor | None,
    *,
    device: str | torch.device | None = None,
) -> dict[str, object]:
    """Resolve methods that need the whole model before the block loop (``welore`` ranks, ``fwsvd`` Fisher).

    Call on the dense model: ``assign = prepare_assign(model, adapter, assign, batches)`` then ``run_compression``.
    """
    del adapter  # names in assign are full dotted module names already
    out: dict[str, object] = dict(assign)
    groups: dict[int, list[str]] = {}
    for n, m in assign.items():
        if m is not None and hasattr(m, "resolve"):
            groups.setdefault(id(m), []).append(n)
    for names in groups.values():
        method = assign[names[0]]
        weights = {n: model.get_submodule(n).weight.detach().float() for n in names}
        out.update(method.resolve(weights))  # type: ignore[union-attr]
    by_axis: dict[str, list[str]] = {}
    for n, m in out.items():
        if m is not None and hasattr(m, "with_fisher") and getattr(m, "fisher_weights", None) is None:
            by_axis.setdefault(getattr(m, "axis", "in"), []).append(n)
    for axis, names in by_axis.items():
        if batches is None:
            raise CalibrationError("fwsvd needs calibration text for its gradient (Fisher) pass; give --calib FILE")
        logger.info("Fisher pass over %d sequences for %d linears", batches.shape[0], len(names))
        fisher = fisher_diagonal(model, batches, names, reduce=axis, device=device)  # type: ignore[arg-type]
        for n in names:
            out[n] = out[n].with_fisher(fisher[n])  # type: ignore[union-attr]
    return out
