"""SliceGPT (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024).

Steps: (1) fold the norms (:func:`~tensorslim.transforms.fold.fold_norms`); (2) at every residual boundary ``k``
(attention input and MLP input of each block, head input) accumulate ``C_k = sum_t x_t^T x_t`` over the calibration
tokens in float64, damp it by ``0.01 * mean(diag C_k)``, and take its eigenvectors by descending eigenvalue; (3) keep
the first ``d'`` of them, ``Q_k`` ``[d, d']``, and rotate/slice with
:func:`~tensorslim.transforms.rotate.rotate_residual` (readers ``W Q``, writers ``Q^T W``, shortcuts ``Q_a^T Q_b``).
``d' = floor((1 - fraction) * d)`` rounded down to a multiple of 8, as the reference does.

Deviation from the reference: the covariances are gathered in one pass over the *unsliced* (folded) model, not
re-propagated through the already sliced layers (the reference's sequential variant). It is simpler and cheaper;
the sequential variant is usually a little better at high slicing.

The result is a Hugging Face model of the same class with ``config.hidden_size = d'`` (``head_dim`` pinned to the
original), untied head, RMSNorm epsilon rescaled by ``d/d'`` (norm gains ``sqrt(d/d')`` so norms still divide by the
original width), and every block a :class:`~tensorslim.transforms.rotate.ShortcutBlock` holding two ``d' x d'``
shortcut matrices. :func:`save_sliced` writes it with ``save_pretrained``; :func:`load_sliced` rebuilds the modules
from the config and loads the safetensors state dict (no pickle). Limits: Llama-like pre-norm causal LMs only;
the FFN width and the heads are untouched; with tied embeddings the untied head adds ``vocab * d'`` parameters.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.adapter import ModelAdapter, get_adapter
from .fold import fold_norms
from .rotate import ShortcutBlock, block_parts, check_rotatable, rotate_residual

__all__ = ["apply_slicegpt", "boundary_covariances", "load_sliced", "save_sliced", "sliced_width"]

logger = logging.getLogger(__name__)
_META = "tensorslim_slicegpt"


def sliced_width(d: int, fraction: float, multiple: int = 8) -> int:
    """Kept residual width: ``floor((1 - fraction) * d)`` rounded down to ``multiple`` (at least ``multiple``)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ConfigError(f"SliceGPT slicing fraction must be a number in [0, 1), got {fraction!r}")
    if fraction == 0:
        return d
    keep = int(math.floor((1.0 - fraction) * d + 1e-9))
    return max(multiple, keep // multiple * multiple)


@torch.no_grad()
def boundary_covariances(model: nn.Module, adapter: ModelAdapter, batches: torch.Tensor, *,
                         batch_size: int = 4) -> list[torch.Tensor]:
    """``sum x^T x`` (float64 ``[d, d]``) of the residual stream at each boundary, in :func:`boundary_count` order."""
    check_rotatable(adapter)
    n1, _, n2, _ = block_parts(adapter)
    points: list[nn.Module] = []
    for block in adapter.get_blocks(model):
        points += [block.get_submodule(n1), block.get_submodule(n2)]
    if adapter.final_norm is None:
        raise ConfigError(f"SliceGPT needs the final norm of the {adapter.arch!r} model")
    points.append(model.get_submodule(adapter.final_norm))
    covs: list[torch.Tensor | None] = [None] * len(points)

    def hook(k: int):
        def fn(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            c = x.T @ x
            covs[k] = c if covs[k] is None else covs[k] + c

        return fn

    handles = [p.register_forward_pre_hook(hook(k)) for k, p in enumerate(points)]
    try:
        dev = next(model.parameters()).device
        for i in range(0, batches.shape[0], batch_size):
            model(batches[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in covs):
        raise ConfigError("SliceGPT: no calibration activations reached every boundary; give at least one batch")
    return [c.cpu() for c in covs]  # type: ignore[union-attr]


def pca_basis(cov: torch.Tensor, width: int, damp: float = 0.01) -> torch.Tensor:
    """The ``width`` leading eigenvectors (descending eigenvalue) of the damped covariance, float64 ``[d, width]``."""
    c = cov.double().clone()
    c.diagonal().add_(damp * float(c.diagonal().mean()))
    vals, vecs = torch.linalg.eigh(c)
    return vecs[:, torch.argsort(vals, descending=True)[:width]].contiguous()


@torch.no_grad()
def apply_slicegpt(model: nn.Module, adapter: ModelAdapter | None, calib_batches: torch.Tensor, fraction: float, *,
                   damp: float = 0.01, batch_size: int = 4) -> nn.Module:
    """Slice ``fraction`` of the residual width off ``model`` (in place; returns it). ``calib_batches``: LongTensor
    ``[n, seq]`` of token ids. ``fraction=0`` is a pure rotation (outputs unchanged up to float error)."""
    adapter = adapter or get_adapter(model)
    check_rotatable(adapter)
    d = model.get_submodule(adapter.embeddings[0]).weight.shape[1]
    width = sliced_width(d, fraction)
    if calib_batches.ndim != 2 or calib_batches.numel() == 0:
        raise ConfigError(f"SliceGPT calib_batches must be a non-empty LongTensor [n, seq], got {tuple(calib_batches.shape)}")
    config = getattr(model, "config", None)
    head_dim = None
    if config is not None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fold_norms(model, adapter)
    covs = boundary_covariances(model, adapter, calib_batches, batch_size=batch_size)
    qs = [pca_basis(c, width, damp) for c in covs]
    energy = [float(torch.linalg.eigvalsh(c.double()).flip(0)[:width].sum() / c.trace()) for c in covs]
    logger.info("SliceGPT %s: width %d -> %d, kept energy min %.4f mean %.4f", adapter.arch, d, width,
                min(energy), sum(energy) / len(energy))
    rotate_residual(model, adapter, qs)
    if config is not None:
        eps_name = "rms_norm_eps" if hasattr(config, "rms_norm_eps") else None
        base_eps = float(getattr(config, eps_name)) if eps_name else None
        config.head_dim = head_dim
        config.hidden_size = width
        if eps_name:
            setattr(config, eps_name, base_eps * d / width)
        setattr(config, _META, {"original_hidden_size": d, "fraction": float(fraction), "width": width})
    return model


def save_sliced(model: nn.Module, path: str | Path) -> None:
    """``save_pretrained`` (safetensors) of a sliced model; :func:`load_sliced` reads it back."""
    if not hasattr(model, "save_pretrained"):
        raise CheckpointError(f"{type(model).__name__} has no save_pretrained; save_sliced needs a Hugging Face model")
    model.save_pretrained(str(path), safe_serialization=True)


def load_sliced(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model written by :func:`save_sliced`: modules from its config, shortcut blocks, safetensors weights."""
    import transformers as hf
    from safetensors.torch import load_file

    p = Path(path)
    try:
        config = hf.AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: no readable Hugging Face config ({e})") from e
    if not getattr(config, _META, None):
        raise CheckpointError(f"{p} is not a SliceGPT checkpoint (its config has no {_META!r} entry)")
    model = hf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    names = block_parts(adapter)
    blocks = adapter.get_blocks(model)
    w = config.hidden_size
    for i, block in enumerate(blocks):
        z = torch.zeros(w, w, dtype=dtype)
        blocks[i] = ShortcutBlock(block, names, z, z.clone())
    state: dict[str, torch.Tensor] = {}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p} holds no .safetensors weights")
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{p}: weights do not match the sliced model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
