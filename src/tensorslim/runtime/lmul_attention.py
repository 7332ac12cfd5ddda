"""L-Mul inside attention: ``Q K^T`` and ``P V`` with every scalar product an L-Mul (Luo & Sun, arXiv 2410.00907).

The paper applies L-Mul to attention ("nearly lossless"); :mod:`.numerics` emulates it in the linear layers. Here the
two attention products go through the same emulation (:func:`~tensorslim.runtime.numerics.lmul_matmul`: operands
rounded to ``m`` mantissa bits, the integer-adder product, fp32 accumulation):
``S = lmul(Q, K^T) * scale + mask``, ``P = softmax(S)`` (exact, fp32), ``O = lmul(P, V)``. GQA: each KV head serves
its ``heads / kv_heads`` consecutive query heads, as Hugging Face's ``repeat_kv``.

Hook-up: transformers' documented extension point for attention kernels. :func:`apply_lmul_attention` registers
``tensorslim_lmul_m<k>`` in ``AttentionInterface`` (and the eager additive mask under the same name in
``AttentionMaskInterface``) the first time it is needed, then sets the model's attention implementation to it
(``model.set_attn_implementation``). Existing entries are never changed; other models are unaffected.
Limits: models whose attention goes through ``AttentionInterface`` (Llama, Mistral, Qwen2/3, Gemma 3); no dropout,
no logit soft-capping (refused), no sliding window beyond what the mask already encodes.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .numerics import lmul_matmul

__all__ = ["apply_lmul_attention", "lmul_attention"]

logger = logging.getLogger(__name__)


def lmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, *,
                   mantissa_bits: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with L-Mul products. ``query [b, h, q, d]``, ``key``/``value [b, kv, k, d]``; returns
    ``(output [b, q, h, d], probabilities [b, h, q, k])`` like transformers' ``eager_attention_forward``."""
    if kwargs.get("softcap") is not None:
        raise ConfigError("L-Mul attention does not emulate attention logit soft-capping")
    if dropout and module.training:
        raise ConfigError("L-Mul attention is an evaluation mode (no attention dropout)")
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    v = value.repeat_interleave(groups, dim=1).float()
    scores = lmul_matmul(query.float(), k, mantissa_bits) * scaling
    if attention_mask is not None:
        mask = attention_mask[..., : k.shape[-2]]
        scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = lmul_matmul(probs, v.transpose(-1, -2), mantissa_bits)
    return out.transpose(1, 2).contiguous().to(query.dtype), probs.to(query.dtype)


def _register(name: str, bits: int) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, functools.partial(lmul_attention, mantissa_bits=bits))
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def apply_lmul_attention(model: nn.Module, mantissa_bits: int) -> nn.Module:
    """Route ``model``'s attention through :func:`lmul_attention` with ``mantissa_bits``. In place; returns it."""
    if not 1 <= mantissa_bits <= 10:
        raise ConfigError(f"L-Mul mantissa width must be in 1..10, got {mantissa_bits}")
    if not hasattr(model, "set_attn_implementation") or not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(f"{type(model).__name__} does not dispatch attention through transformers' "
                                    "AttentionInterface; L-Mul attention cannot be hooked in")
    name = f"tensorslim_lmul_m{mantissa_bits}"
    _register(name, mantissa_bits)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise UnsupportedModelError(f"{type(model).__name__} refused the attention implementation {name!r}")
    logger.info("L-Mul with %d-bit mantissas in attention (Q K^T and P V)", mantissa_bits)
    return model
