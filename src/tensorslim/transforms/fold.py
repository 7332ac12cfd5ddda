"""Norm folding (SliceGPT's "LayerNorm fusion", Ashkboos et al., ICLR 2024, section 3.1): a function-preserving rewrite.

A pre-norm block computes ``f(norm(x))`` where ``norm(x) = x_hat * g + beta`` and the first thing ``f`` does is a
linear ``W``. Then ``W (x_hat * g + beta) + b = (W diag(g)) x_hat + (b + W beta)``: the gain and bias move into every
linear the norm feeds (the adapter's ``group_norms``), and the norm keeps only its normalization (gain 1, no bias).
The final norm folds into the head (untied from the embeddings first).

LayerNorm subtracts the mean before normalizing, which a rotation of the residual stream does not commute with. When a
model's norms are LayerNorms, the mean subtraction is baked into the stream instead: embedding rows and every residual
writer (the adapter groups that no norm feeds: attention out-projection, MLP down-projection) are centred over the
hidden dimension, so the stream is always zero-mean and ``LayerNorm(x) = RMSNorm(x) * g + beta`` holds exactly; each
LayerNorm is then replaced by a gain-free :class:`RMSNorm`. All arithmetic is done in float64 and cast back.

Limits: pre-norm architectures only (the adapter must have ``group_norms``); post-norm models such as BERT raise
:class:`~tensorslim.errors.UnsupportedModelError`. Norms that sit on the residual path (Gemma 3's sandwich norms) are
left as they are; :func:`~tensorslim.transforms.rotate.rotate_residual` refuses such models.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.adapter import ModelAdapter

__all__ = ["RMSNorm", "fold_norms", "residual_writers", "untie_head"]

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``: what a LayerNorm becomes once the stream is zero-mean."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def _check_prenorm(adapter: ModelAdapter) -> None:
    if adapter.kind != "causal_lm" or not adapter.group_norms or all(n is None for n in adapter.group_norms):
        raise UnsupportedModelError(
            f"norm folding needs a pre-norm causal LM whose norms feed linear groups alone; the {adapter.arch!r} "
            "adapter has none (post-norm models such as BERT cannot be folded or rotated)"
        )


def residual_writers(adapter: ModelAdapter) -> list[str]:
    """Relative names of the linears that write the residual stream (groups that no norm feeds)."""
    return [name for group, norm in zip(adapter.linear_groups, adapter.group_norms) if norm is None for name in group]


@torch.no_grad()
def untie_head(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give the head its own weight when it shares the embedding matrix, and record that in the config."""
    if adapter.head is None:
        return
    head = model.get_submodule(adapter.head)
    for emb_name in adapter.embeddings:
        emb = model.get_submodule(emb_name)
        if emb.weight is head.weight or emb.weight.data_ptr() == head.weight.data_ptr():
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", None)
        if callable(text):
            text().tie_word_embeddings = False


def _fold_into(norm: nn.Module, linears: list[nn.Linear], offset: float) -> None:
    g = norm.weight.detach().double() + offset
    beta = getattr(norm, "bias", None)
    for lin in linears:
        w = lin.weight.detach().double()
        if beta is not None:
            shift = w @ beta.detach().double()
            if lin.bias is None:
                lin.bias = nn.Parameter(shift.to(lin.weight.dtype), requires_grad=False)
            else:
                lin.bias.data = (lin.bias.detach().double() + shift).to(lin.bias.dtype)
        lin.weight.data = (w * g[None, :]).to(lin.weight.dtype)


def _reset_norm(norm: nn.Module, offset: float) -> None:
    norm.weight.data = torch.full_like(norm.weight, 1.0 - offset)


def _is_layernorm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None


def _rms_from(norm: nn.Module) -> RMSNorm:
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
    out = RMSNorm(norm.weight.shape[0], eps)
    return out.to(device=norm.weight.device, dtype=norm.weight.dtype)


@torch.no_grad()
def _center_stream(model: nn.Module, adapter: ModelAdapter) -> None:
    """Make every write to the residual stream zero-mean over the hidden dimension (bakes LayerNorm's centring)."""
    for name in adapter.embeddings:
        e = model.get_submodule(name).weight
        e64 = e.detach().double()
        e.data = (e64 - e64.mean(-1, keepdim=True)).to(e.dtype)
    for block in adapter.get_blocks(model):
        for name in residual_writers(adapter):
            lin = block.get_submodule(name)
            w = lin.weight.detach().double()
            lin.weight.data = (w - w.mean(0, keepdim=True)).to(lin.weight.dtype)
            if lin.bias is not None:
                b = lin.bias.detach().double()
                lin.bias.data = (b - b.mean()).to(lin.bias.dtype)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def fold_norms(model: nn.Module, adapter: ModelAdapter) -> nn.Module:
    """Fold every pre-norm gain (and bias) into the linears it feeds; outputs are unchanged. In place; returns ``model``.

    After folding, each folded norm has gain 1 (``1 - norm_weight_offset`` stored) and no bias, and LayerNorms are
    :class:`RMSNorm` modules. The head is untied from the embeddings. Idempotent.
    """
    _check_prenorm(adapter)
    untie_head(model, adapter)
    offset = adapter.norm_weight_offset
    blocks = adapter.get_blocks(model)
    norm_paths = [(b, n) for b in blocks for n in adapter.group_norms if n is not None]
    if adapter.final_norm is not None:
        norm_paths.append((model, adapter.final_norm))
    layer_norms = any(_is_layernorm(root.get_submodule(p)) for root, p in norm_paths)
    if layer_norms:
        _center_stream(model, adapter)
    for block in blocks:
        for group, norm_name in zip(adapter.linear_groups, adapter.group_norms):
            if norm_name is None:
                continue
            norm = block.get_submodule(norm_name)
            _fold_into(norm, [block.get_submodule(n) for n in group], offset)
            if _is_layernorm(norm):
                _set(block, norm_name, _rms_from(norm))
            else:
                _reset_norm(norm, offset)
    if adapter.final_norm is not None:
        norm = model.get_submodule(adapter.final_norm)
        if adapter.head is None:
            raise UnsupportedModelError(f"the {adapter.arch!r} model has a final norm but no head to fold it into")
        _fold_into(norm, [model.get_submodule(adapter.head)], offset)
        if _is_layernorm(norm):
            _set(model, adapter.final_norm, _rms_from(norm))
        else:
            _reset_norm(norm, offset)
    logger.debug("folded %d norms of %s (layernorm=%s)", len(norm_paths), adapter.arch, layer_norms)
    return model
