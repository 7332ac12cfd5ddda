"""Light FlatQuant (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", ICML 2025, arXiv 2410.09426).

Every linear group gets a learnable invertible affine transform of its input, ``x -> (x * c) P`` with
``P = P1 kron P2`` (small factors, e.g. 24 x 24 kron 24 x 24 for 576; sizes from FlatQuant's ``get_decompose_dim``:
``(a - b, a + b)`` with ``a^2 - b^2 = n``, ``a`` the smallest integer >= sqrt(n) that works) and a per-channel scale
``c``; the weights become ``W diag(1/c) P^-T``, so ``x W^T`` is unchanged in exact arithmetic. ``(x * c) P`` costs
``O(n (n1 + n2))`` per token: ``P1^T X P2`` on the ``n1 x n2`` reshape of ``x``.

Fitting (per group, on the full-precision model's inputs, like FlatQuant's FP targets): minimize
``||X W^T - Qa((X * c) P) Qw(W diag(1/c) P^-T)^T||^2 / ||X W^T||^2`` with straight-through rounding, Adam and a cosine
schedule, over random batches of calibration tokens and of output rows (the loss is a sum over both). ``Qw`` is
the weight grid the model will get (asymmetric min-max int, groups along the input, as
:class:`~tensorslim.formats.IntGroup`), ``Qa`` per-token
symmetric int (as :func:`~tensorslim.runtime.actquant.quantize_per_token`). ``P1, P2`` start from the better (lower
calibration loss) of the identity and a randomized Hadamard (random orthogonal where no Hadamard order exists);
``c`` starts at 1. If training ends above the starting loss, the start is kept. The inverse is computed in float64
when merging, so the unquantized model is unchanged (tested). Deterministic for a seed (explicit generators).

Where the transforms live (Llama-like pre-norm blocks; adapter groups ``(q,k,v) (o) (gate,up) (down)``):
- q/k/v and gate/up: ``c`` merges into the feeding RMSNorm's gain; ``P`` runs online after the norm
  (:class:`FlatNorm`), so the linears (and any :class:`~tensorslim.runtime.actquant.QuantIO` input quantizer put on
  them later) see the transformed activations;
- o_proj: a per-KV-head transform ``T_k = diag(c_k) (P1_k kron P2_k)`` of ``head_dim``, fully merged offline:
  ``W_v <- T_k^T W_v`` per kv head (attention mixes tokens, not channels: ``A (V T) = (A V) T``) and
  ``W_o <- W_o blockdiag(T^-T)`` over the query heads;
- down_proj: ``c`` merges into ``up_proj``'s rows, ``P`` runs online inside :class:`FlatMLP`.
Not done (FlatQuant has them): learnable weight / activation clipping (fixed ``act_clip`` instead), the K-cache
transform, block-wise (rather than layer-wise) objective, the SVD parameterization (a direct inverse is used; it is
computed in float64 at merge time, so nothing drifts).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..models.adapter import ModelAdapter
from .hadamard import hadamard_matrix
from .rotate import random_orthogonal

__all__ = ["FlatMLP", "FlatNorm", "FlatQuantConfig", "apply_flatquant", "capture_inputs", "fit_affine", "kron_apply", "kron_factors"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlatQuantConfig:
    """What the transforms are fitted for (``act_bits``/``weight_bits``/``weight_group``) and how long."""

    act_bits: int = 4
    act_clip: float = 0.9
    weight_bits: int = 4
    weight_group: int | None = 64
    steps: int = 100
    lr: float = 1e-2
    batch_tokens: int = 256
    batch_rows: int = 256
    tokens: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("act_bits", "weight_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 2 <= v <= 8:
                raise ConfigError(f"FlatQuantConfig.{name} must be an integer in 2..8, got {v!r}")
        if self.weight_group is not None and (not isinstance(self.weight_group, int) or self.weight_group < 1):
            raise ConfigError(f"FlatQuantConfig.weight_group must be a positive integer or None, got {self.weight_group!r}")
        if not 0 < self.act_clip <= 1:
            raise ConfigError(f"FlatQuantConfig.act_clip must be in (0, 1], got {self.act_clip!r}")
        for name in ("steps", "batch_tokens", "batch_rows", "tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ConfigError(f"FlatQuantConfig.{name} must be a non-negative integer, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"FlatQuantConfig.lr must be positive, got {self.lr!r}")


def kron_factors(n: int) -> tuple[int, int]:
    """``(a - b, a + b)`` with ``(a - b)(a + b) = n`` and ``a`` the smallest integer >= sqrt(n) (FlatQuant's rule)."""
    if n < 1:
        raise ConfigError(f"kron_factors: size must be positive, got {n}")
    a = math.isqrt(n - 1) + 1 if n > 1 else 1
    while True:
        b = math.isqrt(a * a - n)
        if b * b == a * a - n:
            return a - b, a + b
        a += 1


def kron_apply(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """``x @ kron(p1, p2)`` over the last dim, as ``p1^T X p2`` on its ``n1 x n2`` reshape.

    ``p1``/``p2`` may carry a leading head axis ``[K, n, n]``: then ``x``'s last dim is ``K * g * n1 * n2`` and head
    ``k`` (of ``g`` consecutive blocks each) uses ``p1[k], p2[k]``.
    """
    shape = x.shape
    if p1.dim() == 2 or p1.shape[0] == 1:  # two plain GEMMs: (X p2), then p1^T on the transposed blocks
        p1, p2 = p1.reshape(p1.shape[-2:]), p2.reshape(p2.shape[-2:])
        n1, n2 = p1.shape[0], p2.shape[0]
        y = x.reshape(-1, n1, n2) @ p2
        return (y.transpose(1, 2) @ p1).transpose(1, 2).reshape(shape)
    k, n1, n2 = p1.shape[0], p1.shape[-1], p2.shape[-1]
    xs = x.reshape(*shape[:-1], k, -1, n1, n2)
    out = torch.einsum("...kgij,kia,kjb->...kgab", xs, p1, p2)
    return out.reshape(shape)


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_weight(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Asymmetric min-max RTN on IntGroup's grid (``lo = min(w, 0)``, ``hi = max(w, 0)``), straight-through."""
    g = group or w.shape[1]
    wg = w.reshape(w.shape[0], -1, g)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    maxq = (1 << bits) - 1
    s = torch.where(hi > lo, (hi - lo) / maxq, torch.full_like(hi, 2.0 / maxq))
    z = torch.round(-lo / s).clamp(0, maxq).detach()
    q = torch.clamp(_ste_round(wg / s) + z, 0, maxq)
    return ((q - z) * s).reshape(w.shape)


def _fake_act(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    qmax = (1 << (bits - 1)) - 1
    s = (x.abs().amax(-1, keepdim=True) * clip / qmax).clamp(min=1e-12)
    return torch.clamp(_ste_round(x / s), -qmax, qmax) * s


def _start(n: int, heads: int, gen: torch.Generator, hadamard: bool) -> torch.Tensor:
    if not hadamard:
        return torch.eye(n, dtype=torch.float64).expand(heads, n, n).clone()
    mats = []
    for _ in range(heads):
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        try:
            mats.append(hadamard_matrix(n) * signs[None, :])
        except ConfigError:
            mats.append(random_orthogonal(n, seed=int(torch.randint(0, 2**31, (1,), generator=gen))))
    return torch.stack(mats)


@dataclasses.dataclass(frozen=True)
class Affine:
    """A fitted transform: ``p1 [K, n1, n1]``, ``p2 [K, n2, n2]``, ``c [K, n1 * n2]`` (float64) and its losses."""

    p1: torch.Tensor
    p2: torch.Tensor
    c: torch.Tensor
    loss_start: float
    loss_end: float

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(_scale(x, self.c.to(x.dtype)), self.p1.to(x.dtype), self.p2.to(x.dtype))

    def weights(self, w: torch.Tensor) -> torch.Tensor:
        """``W diag(1/c) P^-T`` (float64)."""
        i1, i2 = torch.linalg.inv(self.p1).transpose(-1, -2), torch.linalg.inv(self.p2).transpose(-1, -2)
        return kron_apply(_scale(w.double(), 1.0 / self.c), i1, i2)


def _scale(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    k = c.shape[0]
    return (x.reshape(*x.shape[:-1], k, -1, c.shape[-1]) * c[:, None, :]).reshape(x.shape)


def _loss(x, w, y, p1, p2, c, cfg: FlatQuantConfig) -> torch.Tensor:  # noqa: ANN001 - float32 tensors
    xt = kron_apply(_scale(x, c), p1, p2)
    wt = kron_apply(_scale(w, 1.0 / c), torch.linalg.inv(p1).transpose(-1, -2), torch.linalg.inv(p2).transpose(-1, -2))
    yq = _fake_act(xt, cfg.act_bits, cfg.act_clip) @ _fake_weight(wt, cfg.weight_bits, cfg.weight_group).T
    return (yq - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-30)


def fit_affine(x: torch.Tensor, w: torch.Tensor, cfg: FlatQuantConfig, *, heads: int = 1, head_dim: int | None = None,
               seed: int = 0) -> Affine:
    """Fit one group's transform: ``x [N, n]`` calibration inputs, ``w [out, n]`` the group's stacked weights.

    ``heads`` > 1: a separate transform per head of ``head_dim`` channels, each shared by ``n / (heads * head_dim)``
    consecutive blocks (the query heads of one KV head). Pure: returns the fitted :class:`Affine`.
    """
    n = x.shape[1]
    d = head_dim or n
    if n % (heads * d):
        raise ConfigError(f"fit_affine: {heads} heads of {d} channels do not tile an input of {n}")
    if cfg.weight_group and n % cfg.weight_group:
        raise ConfigError(f"fit_affine: weight group {cfg.weight_group} does not divide the input width {n}")
    n1, n2 = kron_factors(d)
    gen = torch.Generator().manual_seed(seed)
    x, w = x.float(), w.float()
    y = x @ w.T
    c0 = torch.ones(heads, d, dtype=torch.float64)
    starts = [(_start(n1, heads, gen, h), _start(n2, heads, gen, h)) for h in (False, True)]
    with torch.no_grad():
        losses = [float(_loss(x, w, y, a.float(), b.float(), c0.float(), cfg)) for a, b in starts]
    best = min(range(2), key=lambda i: losses[i])
    p1 = nn.Parameter(starts[best][0].float().clone())
    p2 = nn.Parameter(starts[best][1].float().clone())
    log_c = nn.Parameter(torch.zeros(heads, d))
    if cfg.steps:
        opt = torch.optim.Adam([p1, p2, log_c], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 1e-2)
        for _ in range(cfg.steps):
            idx = torch.randint(0, x.shape[0], (min(cfg.batch_tokens, x.shape[0]),), generator=gen)
            rows = torch.randperm(w.shape[0], generator=gen)[:cfg.batch_rows]  # the loss sums over rows: subsample
            loss = _loss(x[idx], w[rows], y[idx][:, rows], p1, p2, log_c.exp(), cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        end = float(_loss(x, w, y, p1, p2, log_c.exp(), cfg))
    if not math.isfinite(end) or end >= losses[best]:
        return Affine(starts[best][0], starts[best][1], c0, losses[best], losses[best])
    return Affine(p1.detach().double(), p2.detach().double(), log_c.detach().double().exp(), losses[best], end)


class FlatNorm(nn.Module):
    """``norm(x) @ (P1 kron P2)``: a pre-norm followed by the online part of a group's FlatQuant transform."""

    def __init__(self, norm: nn.Module, p1: torch.Tensor, p2: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("p1", p1.to(torch.float32).contiguous())
        self.register_buffer("p2", p2.to(torch.float32).contiguous())

    @property
    def weight(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return kron_apply(h, self.p1.to(h.dtype), self.p2.to(h.dtype))


class FlatMLP(nn.Module):
    """A gated MLP whose down-projection input is transformed online: ``down((act(gate x) * up x) @ P)``.

    Keeps the child names ``gate_proj``/``up_proj``/``down_proj``, so adapters and compressed-module swaps work.
    """

    def __init__(self, mlp: nn.Module, p1: torch.Tensor, p2: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.register_buffer("p1", p1.to(torch.float32).contiguous())
        self.register_buffer("p2", p2.to(torch.float32).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(kron_apply(h, self.p1.to(h.dtype), self.p2.to(h.dtype)))


def _check_model(model: nn.Module, adapter: ModelAdapter) -> tuple[int, int, int]:
    groups = adapter.linear_groups
    leaf = [tuple(n.rpartition(".")[2] for n in g) for g in groups]
    if (len(groups) != 4 or leaf[1] != ("o_proj",) or leaf[3] != ("down_proj",) or "v_proj" not in leaf[0]
            or len(adapter.group_norms) != 4 or adapter.group_norms[0] is None or adapter.group_norms[2] is None):
        raise UnsupportedModelError(f"FlatQuant supports Llama-like pre-norm models with gated MLPs; "
                                    f"{adapter.arch!r} has groups {groups} and group norms {adapter.group_norms}")
    for block in adapter.get_blocks(model):
        if isinstance(block.get_submodule(adapter.group_norms[0]), FlatNorm):
            raise ConfigError("apply_flatquant: the model already has FlatQuant transforms; start from the original")
        if not isinstance(block.get_submodule(groups[0][0]), nn.Linear):
            raise ConfigError("apply_flatquant: transform the uncompressed model, then compress it")
    cfg = model.config
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "num_key_value_heads", None) or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: ModelAdapter, data: torch.Tensor, *, tokens: int = 2048,
                   batch_size: int = 8, seed: int = 0) -> list[dict[int, torch.Tensor]]:
    """Per block, per linear group: ``tokens`` random input rows of the group's first linear, from ``data``
    (``[samples, seq_len]`` token ids) run through ``model`` (the full-precision model: FlatQuant's targets)."""
    gen = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(data.shape[0] / batch_size)
    per_call = math.ceil(tokens / n_batches)
    store: list[dict[int, list[torch.Tensor]]] = [{} for _ in adapter.get_blocks(model)]
    hooks = []

    def hook(i: int, g: int):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            idx = torch.randperm(x.shape[0], generator=gen)[:per_call]
            store[i].setdefault(g, []).append(x[idx].clone())
        return fn

    for i, block in enumerate(adapter.get_blocks(model)):
        for g, group in enumerate(adapter.linear_groups):
            hooks.append(block.get_submodule(group[0]).register_forward_pre_hook(hook(i, g)))
    try:
        for s in range(0, data.shape[0], batch_size):
            model(input_ids=data[s:s + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [{g: torch.cat(v)[:tokens] for g, v in blk.items()} for blk in store]


def _set(module: nn.Module, w: torch.Tensor) -> None:
    module.weight.data = w.to(module.weight.dtype)


@torch.no_grad()
def apply_flatquant(model: nn.Module, adapter: ModelAdapter, data: torch.Tensor,
                    config: FlatQuantConfig | None = None, *, batch_size: int = 8,
                    inputs: list[dict[int, torch.Tensor]] | None = None) -> dict[str, list[float]]:
    """Fit and merge FlatQuant transforms into every block of ``model`` (in place), on calibration ``data``
    (``[samples, seq_len]`` token ids; or ``inputs`` already captured from this model by :func:`capture_inputs`).
    Returns the relative layer losses (``start``, ``end``) per group, in order.

    Apply to the uncompressed model, then compress the weights and (for W4A4/W4A8) quantize the activations.
    """
    cfg = config or FlatQuantConfig()
    heads, kv_heads, hd = _check_model(model, adapter)
    acts = inputs if inputs is not None else capture_inputs(model, adapter, data, tokens=cfg.tokens,
                                                            batch_size=batch_size, seed=cfg.seed)
    (qkv, (o_name,), gate_up, (down_name,)) = adapter.linear_groups
    v_name = next(n for n in qkv if n.rpartition(".")[2] == "v_proj")
    off = adapter.norm_weight_offset
    report: dict[str, list[float]] = {"start": [], "end": []}
    for i, block in enumerate(adapter.get_blocks(model)):
        seed = cfg.seed + 1000 * (i + 1)
        lin = {n: block.get_submodule(n) for g in adapter.linear_groups for n in g}
        w = {n: m.weight.detach().double() for n, m in lin.items()}
        # o first: its transform rewrites W_v's rows, which the q/k/v fit must then see
        with torch.enable_grad():
            fo = fit_affine(acts[i][1], w[o_name], cfg, heads=kv_heads, head_dim=hd, seed=seed + 1)
        t = torch.stack([torch.kron(a, b) for a, b in zip(fo.p1, fo.p2)]) * fo.c[:, :, None]  # [K, hd, hd]
        w[v_name] = torch.einsum("kde,kdi->kei", t, w[v_name].reshape(kv_heads, hd, -1)).reshape(-1, w[v_name].shape[1])
        v = lin[v_name]
        if v.bias is not None:
            v.bias.data = torch.einsum("kde,kd->ke", t, v.bias.double().reshape(kv_heads, hd)).reshape(-1).to(v.bias.dtype)
        w[o_name] = fo.weights(w[o_name])
        fits = [fo]
        for g, names in ((0, qkv), (2, gate_up)):
            with torch.enable_grad():
                f = fit_affine(acts[i][g], torch.cat([w[n] for n in names]), cfg, seed=seed + 2 + g)
            norm = block.get_submodule(adapter.group_norms[g])
            norm.weight.data = ((norm.weight.double() + off) * f.c[0] - off).to(norm.weight.dtype)
            for n in names:
                w[n] = f.weights(w[n])
            parent, _, child = adapter.group_norms[g].rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, FlatNorm(norm, f.p1[0], f.p2[0]))
            fits.append(f)
        with torch.enable_grad():
            fd = fit_affine(acts[i][3], w[down_name], cfg, seed=seed + 5)
        up_name = next(n for n in gate_up if n.rpartition(".")[2] == "up_proj")
        w[up_name] = w[up_name] * fd.c[0][:, None]
        if lin[up_name].bias is not None:
            lin[up_name].bias.data = (lin[up_name].bias.double() * fd.c[0]).to(lin[up_name].bias.dtype)
        w[down_name] = fd.weights(w[down_name])
        fits.append(fd)
        for n, m in lin.items():
            _set(m, w[n])
        mlp_name = down_name.rpartition(".")[0]
        parent, _, child = mlp_name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, FlatMLP(block.get_submodule(mlp_name), fd.p1[0], fd.p2[0]))
        for f in fits:
            report["start"].append(f.loss_start)
            report["end"].append(f.loss_end)
        logger.info("FlatQuant block %d: loss %s -> %s", i, [round(f.loss_start, 4) for f in fits],
                    [round(f.loss_end, 4) for f in fits])
    return report
