"""Residual-stream rotation (computational invariance; SliceGPT, Ashkboos et al., ICLR 2024, section 3.2).

After :func:`~tensorslim.transforms.fold.fold_norms`, every norm is a gain-free RMSNorm, and
``RMSNorm(x Q) = RMSNorm(x) Q`` for orthogonal ``Q``. So the residual stream can be expressed in any orthonormal basis:
with ``Q_k`` the basis at boundary ``k`` (row vectors ``x_k' = x_k Q_k``),
- embeddings write in basis ``Q_0``: ``E <- E Q_0``;
- residual readers of block ``i`` (q/k/v read boundary ``2i``; gate/up read ``2i+1``): ``W <- W Q`` (``[out, in]``);
- residual writers (o_proj writes boundary ``2i+1``, down_proj writes ``2i+2``): ``W <- Q^T W``, ``b <- Q^T b``;
- the head reads the last boundary ``2L``: ``W <- W Q_2L``;
- where the basis changes, the skip connection carries ``x Q_a`` into basis ``Q_b``: a *shortcut* ``S = Q_a^T Q_b``
  is applied to the residual before the add (``x_b' = x_a' S + f(...)``). The block is then a :class:`ShortcutBlock`.
With one ``Q`` for every boundary there are no shortcuts and the model keeps its own module classes.

``Q_k`` may be ``[d, d_k]`` with ``d_k < d`` (orthonormal columns): that deletes the stream's components outside the
kept subspace (SliceGPT slicing). The RMSNorms then see ``d_k`` coordinates; to keep normalizing by the original
width they get gain ``sqrt(d / d_k)`` and epsilon ``eps * d / d_k`` (exact: ``x / sqrt(|x|^2/d + eps)``).
All products are computed in float64 and cast back to each weight's dtype.

Limits: pre-norm Llama-like blocks (attention then MLP, each read through one norm); norms on the residual path
(Gemma 3 sandwich norms) or post-norm blocks raise :class:`~tensorslim.errors.UnsupportedModelError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..models.adapter import ModelAdapter
from .fold import residual_writers

__all__ = ["ShortcutBlock", "boundary_count", "check_rotatable", "random_orthogonal", "rotate_residual"]

logger = logging.getLogger(__name__)


class ShortcutBlock(nn.Module):
    """A pre-norm decoder block whose two skip connections carry a basis change (shortcut matrices).

    Holds the original block's norm, attention and MLP modules under their own names, so state-dict keys are the
    Hugging Face ones plus ``attn_shortcut`` ``[d_in, d_mid]`` and ``mlp_shortcut`` ``[d_mid, d_out]``.
    """

    def __init__(self, block: nn.Module, names: tuple[str, str, str, str], attn_shortcut: torch.Tensor,
                 mlp_shortcut: torch.Tensor) -> None:
        super().__init__()
        self.names = names
        for n in names:
            self.add_module(n, block.get_submodule(n))
        for attr in ("attention_type", "layer_idx", "hidden_size"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))
        self.attn_shortcut = nn.Parameter(attn_shortcut, requires_grad=False)
        self.mlp_shortcut = nn.Parameter(mlp_shortcut, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: ANN003 - the block's kwargs
        norm1, attn, norm2, mlp = (getattr(self, n) for n in self.names)
        a = attn(hidden_states=norm1(hidden_states), **kwargs)
        a = a[0] if isinstance(a, tuple) else a
        x = hidden_states @ self.attn_shortcut.to(hidden_states.dtype) + a
        return x @ self.mlp_shortcut.to(x.dtype) + mlp(norm2(x))


def block_parts(adapter: ModelAdapter) -> tuple[str, str, str, str]:
    """(attention norm, attention module, MLP norm, MLP module) names of a Llama-like block, from the adapter."""
    check_rotatable(adapter)
    attn = adapter.linear_groups[0][0].rpartition(".")[0]
    mlp = adapter.linear_groups[2][0].rpartition(".")[0]
    n1, n2 = adapter.group_norms[0], adapter.group_norms[2]
    assert n1 is not None and n2 is not None
    return n1, attn, n2, mlp


def check_rotatable(adapter: ModelAdapter) -> None:
    """Raise UnsupportedModelError unless blocks are pre-norm attention + MLP with every other norm inside attention."""
    ok = (
        adapter.kind == "causal_lm"
        and adapter.head is not None
        and len(adapter.linear_groups) == 4
        and len(adapter.group_norms) == 4
        and adapter.group_norms[0] is not None
        and adapter.group_norms[1] is None
        and adapter.group_norms[2] is not None
        and adapter.group_norms[3] is None
    )
    if ok:
        attn = adapter.linear_groups[0][0].rpartition(".")[0] + "."
        inner = [n for n in adapter.block_norms if n not in adapter.group_norms]
        ok = all(n.startswith(attn) for n in inner)
    if not ok:
        raise UnsupportedModelError(
            f"residual rotation / slicing supports pre-norm Llama-like causal LMs (llama, mistral, qwen2, qwen3); "
            f"the {adapter.arch!r} adapter has norms on the residual path or a different block layout"
        )


def boundary_count(model: nn.Module, adapter: ModelAdapter) -> int:
    """Number of residual-stream boundaries: two per block (attention input, MLP input) plus the head input."""
    return 2 * len(adapter.get_blocks(model)) + 1


def random_orthogonal(d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal ``[d, d]`` matrix (QR of a Gaussian with the sign fix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)


def _check_folded(model: nn.Module, adapter: ModelAdapter) -> None:
    target = 1.0 - adapter.norm_weight_offset
    paths = [(b, n) for b in adapter.get_blocks(model) for n in adapter.group_norms if n is not None]
    paths.append((model, adapter.final_norm)) if adapter.final_norm else None
    for root, p in paths:
        norm = root.get_submodule(p)
        w = norm.weight.detach()
        if getattr(norm, "bias", None) is not None or not torch.allclose(w, torch.full_like(w, target)):
            raise ConfigError(f"rotate_residual: norm {p!r} still has a gain or bias; call fold_norms(model, adapter) first")


def _right(lin: nn.Linear, q: torch.Tensor) -> None:  # reader: W <- W Q
    lin.weight.data = (lin.weight.detach().double() @ q).to(lin.weight.dtype)
    lin.in_features = q.shape[1]


def _left(lin: nn.Linear, q: torch.Tensor) -> None:  # writer: W <- Q^T W, b <- Q^T b
    lin.weight.data = (q.T @ lin.weight.detach().double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (q.T @ lin.bias.detach().double()).to(lin.bias.dtype)
    lin.out_features = q.shape[1]


def _resize_norm(norm: nn.Module, d: int, width: int) -> None:
    """Gain-free RMSNorm over ``width`` kept coordinates that still normalizes by the original width ``d``."""
    base_eps = getattr(norm, "_ts_base_eps", None)
    attr = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"
    if base_eps is None:
        base_eps = float(getattr(norm, attr))
        norm._ts_base_eps = base_eps  # remembered so that rotating twice does not compound the correction
    norm.weight.data = torch.full((width,), math.sqrt(d / width), dtype=norm.weight.dtype, device=norm.weight.device)
    setattr(norm, attr, base_eps * d / width)


@torch.no_grad()
def rotate_residual(model: nn.Module, adapter: ModelAdapter, q: torch.Tensor | Sequence[torch.Tensor]) -> nn.Module:
    """Express the residual stream of a folded model in new orthonormal bases. In place; returns ``model``.

    ``q``: one ``[d, d]`` orthogonal matrix for every boundary, or one ``[d, d_k]`` matrix with orthonormal columns
    per boundary (:func:`boundary_count` of them, in order: block 0 attention input, block 0 MLP input, ..., head
    input). Blocks whose two bases differ become :class:`ShortcutBlock` modules. Call :func:`fold_norms` first.
    """
    check_rotatable(adapter)
    blocks = adapter.get_blocks(model)
    if any(isinstance(b, ShortcutBlock) for b in blocks):
        raise ConfigError("rotate_residual: the model already has shortcut blocks; rotate the original model once")
    _check_folded(model, adapter)
    n = boundary_count(model, adapter)
    d = model.get_submodule(adapter.embeddings[0]).weight.shape[1]
    shared = isinstance(q, torch.Tensor)
    qs = [q] * n if shared else list(q)  # type: ignore[list-item]
    if len(qs) != n:
        raise ConfigError(f"rotate_residual: got {len(qs)} bases for {n} boundaries ({len(blocks)} blocks); give one Q or {n}")
    qs = [t.detach().to(torch.float64, copy=True).cpu() for t in qs]
    for k, t in enumerate(qs):
        if t.ndim != 2 or t.shape[0] != d or t.shape[1] > d or t.shape[1] < 1:
            raise ConfigError(f"rotate_residual: basis {k} has shape {tuple(t.shape)}; expected [{d}, d_k] with d_k <= {d}")
        err = (t.T @ t - torch.eye(t.shape[1], dtype=torch.float64)).abs().max().item()
        if err > 1e-6:
            raise ConfigError(f"rotate_residual: basis {k} does not have orthonormal columns (max |Q^T Q - I| = {err:.2e})")

    def dev(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device)

    for name in adapter.embeddings:
        emb = model.get_submodule(name)
        emb.weight.data = (emb.weight.detach().double() @ dev(qs[0], emb.weight)).to(emb.weight.dtype)
        if hasattr(emb, "embedding_dim"):
            emb.embedding_dim = qs[0].shape[1]
    n1, attn_name, n2, mlp_name = block_parts(adapter)
    writers = residual_writers(adapter)
    for i, block in enumerate(blocks):
        qa, qm, qo = qs[2 * i], qs[2 * i + 1], qs[2 * i + 2]
        w0 = block.get_submodule(adapter.linear_groups[0][0]).weight
        for name in adapter.linear_groups[0]:
            _right(block.get_submodule(name), dev(qa, w0))
        for name in adapter.linear_groups[2]:
            _right(block.get_submodule(name), dev(qm, w0))
        _left(block.get_submodule(writers[0]), dev(qm, w0))
        _left(block.get_submodule(writers[1]), dev(qo, w0))
        _resize_norm(block.get_submodule(n1), d, qa.shape[1])
        _resize_norm(block.get_submodule(n2), d, qm.shape[1])
        same_am = shared or (qa.shape == qm.shape and torch.equal(qa, qm))
        same_mo = shared or (qm.shape == qo.shape and torch.equal(qm, qo))
        if not (same_am and same_mo):
            dtype = w0.dtype
            sa = (qa.T @ qm).to(dtype=dtype, device=w0.device)
            sm = (qm.T @ qo).to(dtype=dtype, device=w0.device)
            blocks[i] = ShortcutBlock(block, (n1, attn_name, n2, mlp_name), sa, sm)
    head = model.get_submodule(adapter.head)  # type: ignore[arg-type]
    _right(head, dev(qs[-1], head.weight))
    if adapter.final_norm is not None:
        _resize_norm(model.get_submodule(adapter.final_norm), d, qs[-1].shape[1])
    logger.debug("rotated the residual stream of %s (%d boundaries, shared=%s)", adapter.arch, n, shared)
    return model
