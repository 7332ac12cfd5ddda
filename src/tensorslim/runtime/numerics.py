"""Numerics modes: LayerCast (bf16 storage, fp32 compute) and an L-Mul emulation of the linear layers.

LayerCast ("Give Me FP32 or Give Me Death?", Yuan et al. 2025): weights are *stored* in bf16 and every computation
runs in fp32 (each linear upcasts its weight on the fly). The model is as small as a bf16 model but its arithmetic is
fp32, and its GEMMs, norms and attention are batch-invariant (:mod:`.invariant`). Here every ``nn.Linear`` becomes
a :class:`LayerCastLinear` holding a bf16 weight; the remaining parameters (embeddings, norms) are rounded to bf16
values and kept as fp32 tensors (they are small and their ops are elementwise or lookups).

L-Mul (Luo & Sun, arXiv 2410.00907): an approximate float multiply done by one integer addition of the
exponent-mantissa fields. For ``x = (1 + a) 2^e``, ``y = (1 + b) 2^f`` with ``m``-bit mantissas ``a, b``, the adder
computes ``s = a + b + 2^-l(m)`` (``l = m`` for ``m <= 3``, 3 for ``m = 4``, 4 above) and returns
``(1 + s - k) 2^(e+f+k)`` with ``k = floor(s)`` the carries out of the mantissa field (``k`` = 2 happens for
``m >= 5``); sign by XOR, zero if an operand is
zero. We emulate this *adder* version (not the paper's formula, which differs on carry), with operands first rounded
to ``m`` mantissa bits (RNE, fp32 exponent range). Its relative error does not vanish as ``m`` grows (the missing
``a b`` term is replaced by a constant): it is at most ``max(2^-l, 0.08)`` (1/8 for ``m >= 3``).

Fast emulation in a matmul: ``lmul(x, y) = P(x) P(y) F[i(x), j(y)]`` with ``P`` the signed power of two and ``F`` the
``2^m x 2^m`` table of mantissa results, so ``sum_k lmul(x_k, w_k) = sum_i A_i B_i^T`` with ``A_i = P(x) [i(x) = i]``
and ``B_i = P(w) F[i, j(w)]``: ``2^m`` ordinary fp32 matmuls of exactly representable terms (8 for ``lmul:m3``).
Attention's ``Q K^T`` and ``P V`` products go through the same emulation (:mod:`.lmul_attention`); fp32 accumulation.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..errors import ConfigError
from .invariant import INVARIANT_ROWS, invariant_linear, make_batch_invariant

__all__ = ["INVARIANT_ROWS", "LMulLinear", "LayerCastLinear", "apply_numerics", "invariant_linear", "lmul", "lmul_matmul", "round_mantissa"]

logger = logging.getLogger(__name__)


class LayerCastLinear(nn.Module):
    """A linear whose weight is stored in bf16 and used in fp32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(torch.bfloat16).float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant_linear(x.float(), self.weight.float(), self.bias)


def _offset_bits(m: int) -> int:
    return m if m <= 3 else (3 if m == 4 else 4)


def round_mantissa(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x`` rounded to ``m`` explicit mantissa bits (round half to even), float32."""
    f, e = torch.frexp(x.float())  # x = f 2^e, |f| in [0.5, 1)
    return torch.ldexp(torch.round(torch.ldexp(f, torch.full_like(e, m + 1))), e - (m + 1))


def _split(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed power of two ``P(x)`` and mantissa index ``i(x)`` in ``0..2^m-1`` of an ``m``-bit-rounded ``x``."""
    f, e = torch.frexp(x)
    p = torch.where(x == 0, torch.zeros_like(x), torch.sign(x) * torch.ldexp(torch.ones_like(x), e - 1))
    idx = torch.round((2 * f.abs() - 1) * (1 << m)).long().clamp(0, (1 << m) - 1)
    return p, idx


def lmul_table(m: int) -> torch.Tensor:
    """``F[i, j]``: the adder's result for mantissas ``i/2^m``, ``j/2^m`` (exponent sum 0), float64."""
    a = torch.arange(1 << m, dtype=torch.float64) / (1 << m)
    s = a[:, None] + a[None, :] + 2.0 ** -_offset_bits(m)
    k = torch.floor(s)  # carries out of the mantissa field (2 are possible when l < m)
    return (1 + s - k) * 2.0**k


def lmul(x: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
    """Elementwise L-Mul (adder version) of ``m``-bit-mantissa operands; the reference for :func:`lmul_matmul`."""
    px, i = _split(round_mantissa(x, m), m)
    py, j = _split(round_mantissa(y, m), m)
    return (px.double() * py.double() * lmul_table(m).to(x.device)[i, j]).to(torch.float32)


def lmul_matmul(x: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    """``x @ w^T`` (over the last two dims, batched) with every scalar product an L-Mul (``2^m`` fp32 matmuls)."""
    px, i = _split(round_mantissa(x, m), m)
    pw, j = _split(round_mantissa(w, m), m)
    table = lmul_table(m).float().to(x.device)
    out = None
    for k in range(1 << m):
        a = torch.where(i == k, px, torch.zeros_like(px))
        b = pw * table[k][j]
        y = a @ b.transpose(-1, -2)
        out = y if out is None else out + y
    return out


class LMulLinear(nn.Module):
    """A linear layer whose products are L-Mul with ``m``-bit mantissas (activations and weights rounded to m bits)."""

    def __init__(self, linear: nn.Module, mantissa_bits: int) -> None:
        super().__init__()
        self.inner = linear
        self.mantissa_bits = mantissa_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        w = inner.weight if isinstance(inner, nn.Linear) else inner.compressed.decode()
        y = lmul_matmul(x.float().reshape(-1, x.shape[-1]), w.float(), self.mantissa_bits)
        y = y.reshape(*x.shape[:-1], -1)
        if getattr(inner, "bias", None) is not None:
            y = y + inner.bias.float()
        return y.to(x.dtype)


_LMUL = re.compile(r"^lmul:m(\d+)$")


@torch.no_grad()
def apply_numerics(model: nn.Module, kind: str, adapter=None, *, attention: bool = True) -> nn.Module:  # noqa: ANN001
    """``layercast``: bf16 storage, fp32 compute. ``bf16``: plain bf16 (for comparison). ``lmul:m<k>``: L-Mul in the
    block linears (``adapter`` given) or in every linear but the head, and (``attention``) in the attention products.
    In place; returns ``model``."""
    # parameters are converted one by one: transformers refuses model.to(dtype) / .float() on GGUF-loaded models
    if kind == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        return model
    if kind == "layercast":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).float()
        _replace(model, lambda name, mod: isinstance(mod, nn.Linear), LayerCastLinear)
        make_batch_invariant(model)
        logger.info("LayerCast: bf16 weights, fp32 compute, batch-invariant GEMMs, norms and attention")
        return model
    m = _LMUL.match(kind)
    if m:
        bits = int(m.group(1))
        if not 1 <= bits <= 10:
            raise ConfigError(f"L-Mul mantissa width must be in 1..10, got {bits}")
        if adapter is not None:
            names = set(adapter.linear_names(model))
            pred = lambda name, mod: name in names  # noqa: E731
        else:
            head = "lm_head"
            pred = lambda name, mod: isinstance(mod, nn.Linear) and not name.endswith(head)  # noqa: E731
        _replace(model, pred, lambda mod: LMulLinear(mod, bits))
        logger.info("L-Mul with %d-bit mantissas in the linear layers", bits)
        if attention:
            from .lmul_attention import apply_lmul_attention

            apply_lmul_attention(model, bits)
        return model
    raise ConfigError(f"unknown numerics mode {kind!r}; use layercast, bf16 or lmul:m<bits> (e.g. lmul:m3)")


def _replace(model: nn.Module, pred, make) -> int:  # noqa: ANN001
    targets = [(n, mod) for n, mod in model.named_modules() if n and pred(n, mod)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod))
    return len(targets)
