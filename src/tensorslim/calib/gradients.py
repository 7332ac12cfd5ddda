"""Per-sequence gradient pass for M-FAC (:mod:`tensorslim.methods.mfac`): ``m`` loss gradients of chosen linears.

One causal-LM-loss backward per calibration sequence (``m`` sequences), keeping each named linear's weight gradient
``[out, in]``: the result is ``[m, out, in]`` per linear, stored in ``store_dtype`` (float32 default; bfloat16 halves
it). Memory-bounded: gradients are enabled only on the requested weights, and :func:`prepare_mfac` splits the layers
into chunks whose gradients fit ``max_bytes``, repeating the ``m`` backward passes per chunk (compute for memory).
Flags and ``.grad`` fields of the model are restored; weights are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import CalibrationError, UnsupportedModelError

__all__ = ["collect_gradients", "per_sequence_gradients", "prepare_mfac"]

logger = logging.getLogger(__name__)


def per_sequence_gradients(model: nn.Module, batches: torch.Tensor, names: Iterable[str], *, m: int | None = None,
                           device: str | torch.device | None = None, what: str = "the gradient pass",
                           ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(i, {name: dL_i/dW})`` for the first ``m`` sequences of ``batches``: one causal-LM-loss backward each.

    The one gradient loop of the project (M-FAC stores the gradients, the Fisher pass sums their squares). Gradients
    are enabled only on the named weights; the model's ``requires_grad`` flags, ``.grad`` fields and train/eval mode
    are restored afterwards. A yielded gradient is only valid until the next step (copy what you keep).
    """
    if batches is None or batches.ndim != 2 or batches.shape[0] == 0 or batches.shape[1] < 2:
        raise CalibrationError(f"{what} needs calibration token ids [n, seq] with n >= 1 and seq >= 2")
    m = batches.shape[0] if m is None else m
    if not 1 <= m <= batches.shape[0]:
        raise CalibrationError(f"{what} wants {m} gradients but there are {batches.shape[0]} calibration sequences")
    weights: dict[str, nn.Parameter] = {}
    for n in names:
        w = getattr(model.get_submodule(n), "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise UnsupportedModelError(f"{n!r} is not a linear layer with a 2-D weight (already compressed?)")
        weights[n] = w  # type: ignore[assignment]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in weights.values():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for i in range(m):
                ids = batches[i:i + 1].to(device)
                loss = getattr(model(input_ids=ids, labels=ids), "loss", None)
                if loss is None:
                    raise UnsupportedModelError(
                        f"{type(model).__name__} returned no language-model loss; {what} needs a causal LM")
                if not torch.isfinite(loss):
                    raise CalibrationError(f"the LM loss of calibration sequence {i} is not finite")
                loss.backward()
                yield i, {n: p.grad.detach() for n, p in weights.items()}  # type: ignore[union-attr]
                for p in weights.values():
                    p.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
            p.grad = None
        model.train(was_training)


def collect_gradients(model: nn.Module, batches: torch.Tensor, names: Iterable[str], *, m: int | None = None,
                      store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{name: [m, out, in]}`` LM-loss gradients of the named linears, one per sequence of ``batches[:m]``."""
    names = list(names)
    m = batches.shape[0] if (m is None and batches is not None) else m
    out: dict[str, torch.Tensor] = {}
    for i, grads in per_sequence_gradients(model, batches, names, m=m, what="M-FAC's gradient pass"):
        for n, g in grads.items():
            if n not in out:
                out[n] = torch.empty((m, *g.shape), dtype=store_dtype)
            out[n][i] = g.to("cpu", store_dtype)
    return out


def prepare_mfac(model: nn.Module, assign: Mapping[str, object], batches: torch.Tensor, *, m: int | None = None,
                 max_bytes: int = 4 << 30, store_dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """Bind every ``MFAC`` method of ``assign`` to its layer's gradients (call on the dense model, before the
    runner). Layers are processed in chunks of at most ``max_bytes`` of gradients."""
    from ..methods.mfac import MFAC

    out = dict(assign)
    names = [n for n, meth in assign.items() if isinstance(meth, MFAC) and meth.gradients is None]
    if not names:
        return out
    m = batches.shape[0] if m is None else m
    per = torch.empty((), dtype=store_dtype).element_size() * m
    chunk: list[str] = []
    size = 0

    def flush() -> None:
        if chunk:
            logger.info("M-FAC gradient pass: %d sequences for %d linears", m, len(chunk))
            grads = collect_gradients(model, batches, chunk, m=m, store_dtype=store_dtype)
            for n in chunk:
                out[n] = assign[n].with_gradients(grads[n])  # type: ignore[union-attr]

    for n in names:
        b = model.get_submodule(n).weight.numel() * per
        if chunk and size + b > max_bytes:
            flush()
            chunk, size = [], 0
        chunk.append(n)
        size += b
    flush()
    return out
