"""KV-cache quantization as a runtime mode: int8 / int4 per head, and block floating point with K-sort.

The keys and values are fake-quantized where they are produced (the ``k_proj`` / ``v_proj`` outputs, i.e. before
RoPE, as KVQuant does), so every attention read sees the quantized cache.
- ``int8`` / ``int4``: per token and per head (``head_dim`` channels), asymmetric min-max, ``round``, fp32 math
  (stored cost would be ``b`` bits + an fp16 scale and zero per head-token: 4.5 bits/value at ``head_dim`` 64).
- ``bfp4``: block floating point (d-Matrix BFP, Trukhanov & Soloveychik, arXiv 2403.20137): blocks of ``block``
  (16) channels share one exponent ``e = ceil(log2(max|x| / 7))``; each value keeps a 4-bit signed mantissa
  ``clamp(round(x / 2^e), -7, 7)`` (4 + 8/16 = 4.5 bits/value). One outlier channel coarsens its whole block, so with
  ``reorder`` (K-sort) the channels of each head are grouped by magnitude first: sorted by the row norms of ``W_k``
  (resp. ``W_v``), computed once from the weights. Permuting ``q``/``k`` channels together leaves ``q . k`` unchanged,
  so a real kernel stores the permuted layout at no run-time cost; this emulation forms blocks in the sorted order
  and scatters back, which is the same arithmetic.

Limits: emulation (fake quantization); the sort is per head and computed from the *current* (possibly compressed)
projection weights; RoPE pairs are not considered because quantization happens before RoPE here.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapter import ModelAdapter
from .actquant import unwrapped, wrap_io

__all__ = ["KVQuant", "apply_kv_quant", "bfp_quantize", "ksort_permutation", "quantize_groups_asym"]

logger = logging.getLogger(__name__)

KINDS = ("int8", "int4", "bfp4", "bfp8")


def quantize_groups_asym(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max fake quantization of consecutive groups of ``group`` channels (last dim)."""
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    maxq = (1 << bits) - 1
    s = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(hi))
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(xf / s) + z, 0, maxq)
    return ((q - z) * s).reshape(shape).to(x.dtype)


def bfp_quantize(x: torch.Tensor, mantissa_bits: int = 4, block: int = 16) -> torch.Tensor:
    """Block floating point over consecutive blocks of the last dim: shared exponent, signed mantissas."""
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    mmax = (1 << (mantissa_bits - 1)) - 1
    amax = xf.abs().amax(-1, keepdim=True)
    e = torch.ceil(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)) / mmax))
    step = torch.exp2(e)
    return (torch.clamp(torch.round(xf / step), -mmax, mmax) * step).reshape(shape).to(x.dtype)


def ksort_permutation(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Channel order that sorts each head's output rows of ``weight [heads*hd, in]`` by L2 norm (descending)."""
    hd = weight.shape[0] // heads
    norms = weight.detach().float().norm(dim=1).reshape(heads, hd)
    order = torch.argsort(norms, dim=1, descending=True)
    return (order + torch.arange(heads, device=order.device).unsqueeze(1) * hd).reshape(-1)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class KVQuant:
    """Output quantizer of one k/v projection: ``kind`` in :data:`KINDS`, per-head groups, optional channel order."""

    kind: str
    head_dim: int
    block: int = 16
    perm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown KV-cache quantization {self.kind!r}; use one of {KINDS}")
        if self.kind.startswith("bfp") and self.head_dim % self.block:
            raise ConfigError(f"BFP block {self.block} does not divide head_dim {self.head_dim}; use 16 or 32")

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            y = y[..., self.perm]
        if self.kind.startswith("int"):
            q = quantize_groups_asym(y, int(self.kind[3:]), self.head_dim)
        else:
            q = bfp_quantize(y, int(self.kind[3:]), self.block)
        if self.perm is not None:
            out = torch.empty_like(q)
            out[..., self.perm] = q
            q = out
        return q

    def __repr__(self) -> str:
        return f"KVQuant({self.kind}, head_dim={self.head_dim}, block={self.block}, reorder={self.perm is not None})"


def _dense_weight(module: nn.Module) -> torch.Tensor:
    m = unwrapped(module)
    return m.weight if isinstance(m, nn.Linear) else m.compressed.decode()


def apply_kv_quant(model: nn.Module, adapter: ModelAdapter, kind: str, *, block: int = 16,
                   reorder: bool | None = None) -> nn.Module:
    """Quantize the K and V caches (``kind``: ``int8``, ``int4``, ``bfp4``, ``bfp8``). In place; returns ``model``.

    ``reorder`` (K-sort) defaults to True for BFP and False for the integer kinds.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown KV-cache quantization {kind!r}; use one of {KINDS}")
    reorder = kind.startswith("bfp") if reorder is None else reorder
    cfg = model.config
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    attn = adapter.linear_groups[0][0].rpartition(".")[0]
    for block_mod in adapter.get_blocks(model):
        for proj in ("k_proj", "v_proj"):
            name = f"{attn}.{proj}"
            perm = ksort_permutation(_dense_weight(block_mod.get_submodule(name)), kv_heads) if reorder else None
            wrap_io(block_mod, name, out_quant=KVQuant(kind=kind, head_dim=hd, block=block, perm=perm))
    logger.info("KV-cache quantization %s (reorder=%s)", kind, reorder)
    return model
