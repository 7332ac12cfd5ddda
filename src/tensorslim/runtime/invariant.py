"""Batch invariance: a sequence's results do not depend on what else shares the batch.

GPU kernels choose their tiling, split-K and reduction strategy from the problem size, so the same row can be summed
in a different order when it runs alone or inside a batch: GEMMs (handled by :func:`invariant_linear`, fixed 64-row
calls), attention (fp32 SDPA on an H100 gave a decode step's logits 1.5e-6 apart between batch 1 and 8) and row
reductions such as RMSNorm (PyTorch splits one row over several blocks when there are few rows). This module makes
the latter two invariant:

- :func:`invariant_attention` is registered with transformers' ``AttentionInterface`` as ``"tensorslim_invariant"``:
  SDPA called once per sequence, so every call has batch 1 whatever the batch;
- :func:`invariant_rows` runs a row-wise module (a norm) on fixed ``INVARIANT_ROWS``-row chunks of its input (the last
  zero-padded), so every call has the same shape; :func:`make_batch_invariant` installs it as the norms' ``forward``
  (an instance attribute: parameters and state-dict keys are unchanged).

Both give bit-identical results to the wrapped computation run on the rows alone (tested).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["ATTENTION_NAME", "INVARIANT_ROWS", "invariant_attention", "invariant_linear", "invariant_rows",
           "make_batch_invariant"]

# Rows per call: every GEMM / norm call has exactly this many rows (the last chunk zero-padded), so the library always
# picks the same kernel and a row's result never depends on how many other rows (batch size, sequence length) share
# the call.
INVARIANT_ROWS = 64
ATTENTION_NAME = "tensorslim_invariant"


def _chunked(flat: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
    n = flat.shape[0]
    padded = -(-n // INVARIANT_ROWS) * INVARIANT_ROWS
    if padded != n:
        flat = torch.cat([flat, flat.new_zeros(padded - n, *flat.shape[1:])])
    return torch.cat([fn(flat[i:i + INVARIANT_ROWS]) for i in range(0, padded, INVARIANT_ROWS)])[:n]


def invariant_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + bias`` computed in fixed-size row chunks: batch-invariant results."""
    lead, k = x.shape[:-1], x.shape[-1]
    out = _chunked(x.reshape(-1, k), lambda c: c @ w.T)
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, w.shape[0])


def invariant_rows(fn, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """A row-wise function (normalization over the last dimension) applied in fixed ``INVARIANT_ROWS``-row chunks."""
    lead, d = x.shape[:-1], x.shape[-1]
    out = _chunked(x.reshape(-1, d), fn)
    return out.reshape(*lead, out.shape[-1])


def invariant_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, one sequence per call (``[B, H, q, d]`` inputs, ``[B, q, H, d]`` output)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outs = []
    for b in range(query.shape[0]):
        mask = None if attention_mask is None else attention_mask[b:b + 1] if attention_mask.shape[0] > 1 \
            else attention_mask
        outs.append(sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1], value[b:b + 1], mask, **kwargs)[0])
    return torch.cat(outs), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, invariant_attention)


def _is_row_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) or type(mod).__name__.endswith("RMSNorm")


def make_batch_invariant(model: nn.Module) -> nn.Module:
    """Per-sequence attention and fixed-chunk norms (the linears are the caller's: see ``LayerCastLinear``). In place."""
    for mod in model.modules():
        if _is_row_norm(mod) and not isinstance(mod.forward, functools.partial):
            mod.forward = functools.partial(invariant_rows, mod.forward)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):
        _register_attention()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION_NAME)
        else:  # older transformers
            config._attn_implementation = ATTENTION_NAME
    return model
