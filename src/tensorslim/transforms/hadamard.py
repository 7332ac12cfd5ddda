"""QuaRot-style rotations (Ashkboos et al., arXiv 2404.00456): Hadamard or random orthogonal, function-preserving.

Three rotations, each exact in real arithmetic (all folding in float64):
1. the residual stream, ``x -> x Q`` (``Q`` = randomized Hadamard ``H diag(+-1) / sqrt(d)`` or Haar-random), after
   norm folding: :func:`~tensorslim.transforms.fold.fold_norms` then
   :func:`~tensorslim.transforms.rotate.rotate_residual` (readers ``W Q``, writers ``Q^T W``);
2. per attention head, the values: ``W_v <- H_d^T W_v`` per kv head and ``W_o <- W_o blockdiag(H_d)`` over the
   query heads (attention mixes tokens, not channels, so ``softmax(.) (V H) = (softmax(.) V) H``). Offline;
3. inside the MLP, an *online* rotation of the down-projection input: :class:`RotatedMLP` computes
   ``down((act(gate x) * up x) R)`` and holds ``W_down <- W_down R`` (the elementwise product cannot
   absorb ``R``, so it is applied at run time, like QuaRot's online Hadamard; here a dense matmul, not a fast
   Walsh-Hadamard kernel). The module keeps the child names ``gate_proj``/``up_proj``/``down_proj``, so adapters,
   the runner and compressed-module swaps see the same paths, and statistics of ``down_proj`` see its real (rotated)
   input.

Hadamard matrices: ``n = 2^k m`` with a Paley-I core of order ``m = p + 1`` (``p`` prime, ``p = 3 mod 4``), tensored
with Sylvester's ``H_2``; e.g. 576 = 8 * 72 (p = 71), 1536 = 4 * 384 (p = 383), 64 = 2^6. Sizes without such a
factorization raise :class:`ConfigError` (use ``random``).
Limits: Llama-like pre-norm models (what ``rotate_residual`` supports) with gated MLPs (``gate_proj``, ``up_proj``,
``down_proj``, ``act_fn``).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..models.adapter import ModelAdapter
from .fold import fold_norms
from .rotate import random_orthogonal, rotate_residual

__all__ = ["RotatedMLP", "apply_rotation", "hadamard_matrix", "rotation_matrix"]

logger = logging.getLogger(__name__)

KINDS = ("hadamard", "random")


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % k for k in range(2, int(math.isqrt(p)) + 1))


def _paley(p: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order ``p + 1`` for a prime ``p = 3 mod 4`` (entries +-1)."""
    residues = {(k * k) % p for k in range(1, p)}
    chi = torch.tensor([0] + [1 if k in residues else -1 for k in range(1, p)], dtype=torch.float64)
    idx = torch.arange(p)
    jac = chi[(idx[None, :] - idx[:, None]) % p]  # Jacobsthal matrix Q_ij = chi(j - i)
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + torch.eye(p + 1, dtype=torch.float64)


def hadamard_matrix(n: int) -> torch.Tensor:
    """An orthogonal Hadamard matrix ``H / sqrt(n)`` of order ``n`` (float64). ConfigError when none is constructible."""
    if n < 1:
        raise ConfigError(f"hadamard_matrix: order must be positive, got {n}")
    k, core = 0, None
    m = n
    while True:
        if m == 1:
            core = torch.ones(1, 1, dtype=torch.float64)
        elif m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            core = _paley(m - 1)
        if core is not None or m % 2:
            break
        m //= 2
        k += 1
    if core is None:
        raise ConfigError(f"no Hadamard matrix of order {n} is constructible here (2^k (p+1), p prime = 3 mod 4); "
                          "use the 'random' rotation")
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = core
    for _ in range(k):
        h = torch.kron(h2, h)
    return h / math.sqrt(n)


def rotation_matrix(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """``hadamard``: ``H diag(s)`` with random signs ``s`` (QuaRot's randomized Hadamard); ``random``: Haar. float64."""
    if kind == "hadamard":
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return hadamard_matrix(n) * signs[None, :]
    if kind == "random":
        return random_orthogonal(n, seed=seed)
    raise ConfigError(f"unknown rotation {kind!r}; use one of {KINDS}")


class RotatedMLP(nn.Module):
    """A gated MLP whose down-projection input is rotated online: ``down((act(gate x) * up x) R)``."""

    def __init__(self, mlp: nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise UnsupportedModelError(f"{type(mlp).__name__} has no {name!r}; the online MLP rotation needs a gated MLP")
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.register_buffer("rotation", rotation.to(torch.float32).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h @ self.rotation.to(h.dtype))


def _attention_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


@torch.no_grad()
def _rotate_heads(model: nn.Module, adapter: ModelAdapter, h: torch.Tensor) -> None:
    heads, kv_heads, hd = _attention_shape(model)
    attn = adapter.linear_groups[0][0].rpartition(".")[0]
    for block in adapter.get_blocks(model):
        v = block.get_submodule(f"{attn}.v_proj")
        o = block.get_submodule(f"{attn}.o_proj")
        wv = v.weight.detach().double().reshape(kv_heads, hd, -1)
        v.weight.data = torch.einsum("de,kdi->kei", h, wv).reshape(v.weight.shape).to(v.weight.dtype)
        if v.bias is not None:
            v.bias.data = (v.bias.detach().double().reshape(kv_heads, hd) @ h).reshape(-1).to(v.bias.dtype)
        wo = o.weight.detach().double().reshape(o.weight.shape[0], heads, hd)
        o.weight.data = (wo @ h).reshape(o.weight.shape).to(o.weight.dtype)


@torch.no_grad()
def apply_rotation(model: nn.Module, adapter: ModelAdapter, kind: str = "hadamard", seed: int = 0, *,
                   heads: bool = True, mlp: bool = True) -> nn.Module:
    """Fold norms, rotate the residual stream, the attention values per head and (online) the MLP inner stream.

    In place; returns ``model``. The unquantized model computes the same function (up to float rounding).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown rotation {kind!r}; use one of {KINDS}")
    mlp_name = adapter.linear_groups[3][0].rpartition(".")[0]
    if any(isinstance(b.get_submodule(mlp_name), RotatedMLP) for b in adapter.get_blocks(model)):
        raise ConfigError("apply_rotation: the model is already rotated; rotate the original model once")
    d = model.get_submodule(adapter.embeddings[0]).weight.shape[1]
    fold_norms(model, adapter)
    rotate_residual(model, adapter, rotation_matrix(kind, d, seed))
    if heads:
        _rotate_heads(model, adapter, rotation_matrix(kind, _attention_shape(model)[2], seed + 1))
    if mlp:
        for block in adapter.get_blocks(model):
            m = block.get_submodule(mlp_name)
            r = rotation_matrix(kind, m.down_proj.in_features, seed + 2)
            m.down_proj.weight.data = (m.down_proj.weight.detach().double() @ r).to(m.down_proj.weight.dtype)
            setattr(block, mlp_name, RotatedMLP(m, r))
    logger.info("applied %s rotation (seed %d) to %s", kind, seed, adapter.arch)
    return model
