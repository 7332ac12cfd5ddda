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
through unchanged. Methods whose ``resolve`` needs activations (``resolve_needs_grams``: ``svd-whitened-global``)
get ``grams`` from :func:`dense_grams`, one forward pass of the dense model with hooks on the named linears.
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
        if getattr(method, "resolve_needs_grams", False):
            if batches is None:
                raise CalibrationError(f"{method.name} allocates ranks from activations; give calibration text (--calib FILE)")  # type: ignore[union-attr]
            out.update(method.resolve(weights, grams=dense_grams(model, batches, names, device=device)))  # type: ignore[union-attr]
        else:
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


class _Done(Exception):
    pass


@torch.inference_mode()
def dense_grams(
    model: nn.Module,
    batches: torch.Tensor,
    names: Iterable[str],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """``X^T X / N`` (float32, CPU) of the inputs of each named linear, from one forward of the dense model.

    Linears that read the same tensor (q/k/v, gate/up) share one accumulator, so memory is one ``[in, in]`` matrix per
    distinct input. Token ids only (no padding mask): the runner's calibration convention.
    """
    names = list(dict.fromkeys(names))
    fired: set[str] = set()
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    last: list = [None, None]  # the previous hooked input and its owner (held, so its memory cannot be reused)
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def hook(n: str):
        def f(_m, inp, _o):
            x = inp[0]
            fired.add(n)
            if x is last[0] and last[1] != n:
                alias[n] = last[1]
            else:
                last[0], last[1] = x, n
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                sums[n] = sums[n] + rows.T @ rows if n in sums else rows.T @ rows
            if len(fired) == len(names):
                raise _Done  # every named linear has its input: skip the rest (an LM head's logits are large)
        return f

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    count = 0
    try:
        for chunk in batches.split(batch_size):
            fired.clear()
            try:
                model(input_ids=chunk.to(device))
            except _Done:
                pass
            count += chunk.numel()
    finally:
        last[0] = None
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in sums and n not in alias]
    if missing:
        raise CalibrationError(f"no calibration tokens reached {missing[:3]}")
    return {n: (sums[alias.get(n, n)] / count).cpu() for n in names}
