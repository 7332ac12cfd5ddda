"""SmoothQuant-style per-channel smoothing (Xiao et al., ICML 2023): move activation outliers into the weights.

For a linear group fed by one norm (q/k/v by the attention norm, gate/up by the MLP norm), with per-channel
activation maxima ``a_j = max|X_j|`` (of the norm's output) and weight maxima ``m_j = max over the group's rows of
|W_ij|``: ``s_j = a_j^alpha / m_j^(1 - alpha)`` (clamped to ``>= 1e-5``), then ``gain_j <- gain_j / s_j`` in the
norm and ``W_:j <- W_:j s_j`` in every linear of the group. ``X diag(1/s) (W diag(s))^T = X W^T``: exact.

Statistics come from :func:`collect_norm_absmax` (forward hooks on the norms over calibration batches; the runner's
ABSMAX statistic of the group's first linear is the same quantity). Stored: nothing new, the model is rewritten in
place. Limits: norm-fed groups only (o_proj / down_proj inputs are not smoothed: nothing upstream can absorb ``s``
except v_proj / up_proj rows, not done); the norm must have a per-channel gain (Gemma's ``1 + w`` is handled).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError, UnsupportedModelError
from ..models.adapter import ModelAdapter

__all__ = ["apply_smoothing", "collect_norm_absmax", "smoothing_scales"]

logger = logging.getLogger(__name__)


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """``s_j = a_j^alpha / max_i |W_ij|^(1 - alpha)`` over the group's weights (float64)."""
    if not 0 <= alpha <= 1:
        raise ConfigError(f"smoothing alpha must be in [0, 1], got {alpha}")
    wmax = torch.stack([w.detach().double().abs().amax(0) for w in weights]).amax(0)
    s = act_absmax.double().clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5)


def _norm_groups(adapter: ModelAdapter) -> list[tuple[str, tuple[str, ...]]]:
    pairs = [(n, g) for n, g in zip(adapter.group_norms, adapter.linear_groups) if n is not None]
    if not pairs:
        raise UnsupportedModelError(f"the {adapter.arch!r} adapter has no norm-fed linear groups to smooth")
    return pairs


@torch.no_grad()
def collect_norm_absmax(model: nn.Module, adapter: ModelAdapter, batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel ``max|x|`` of every group norm's output over ``batches`` ``[n, seq]``; keys ``"<block>.<norm>"``."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(adapter.get_blocks(model)):
        for norm_name, _ in _norm_groups(adapter):
            key = f"{i}.{norm_name}"

            def hook(_m, _args, y, key=key):  # noqa: ANN001
                m = y.detach().float().abs().reshape(-1, y.shape[-1]).amax(0)
                out[key] = m if key not in out else torch.maximum(out[key], m)

            handles.append(block.get_submodule(norm_name).register_forward_hook(hook))
    try:
        for row in batches:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def apply_smoothing(model: nn.Module, adapter: ModelAdapter, act_absmax: dict[str, torch.Tensor],
                    alpha: float = 0.5) -> nn.Module:
    """Smooth every norm-fed group with the given activation maxima. In place; returns ``model``."""
    offset = adapter.norm_weight_offset
    for i, block in enumerate(adapter.get_blocks(model)):
        for norm_name, group in _norm_groups(adapter):
            key = f"{i}.{norm_name}"
            if key not in act_absmax:
                raise CalibrationError(f"smoothing needs the activation maxima of {key!r}; run collect_norm_absmax")
            linears = [block.get_submodule(n) for n in group]
            if not all(isinstance(l, nn.Linear) for l in linears):
                raise UnsupportedModelError("smoothing rewrites dense nn.Linear weights; smooth before compressing")
            s = smoothing_scales(act_absmax[key], [l.weight for l in linears], alpha)
            norm = block.get_submodule(norm_name)
            g = norm.weight.detach().double() + offset
            norm.weight.data = (g / s - offset).to(norm.weight.dtype)
            if getattr(norm, "bias", None) is not None:
                norm.bias.data = (norm.bias.detach().double() / s).to(norm.bias.dtype)
            for l in linears:
                l.weight.data = (l.weight.detach().double() * s).to(l.weight.dtype)
    logger.info("SmoothQuant smoothing (alpha %.2f) on %s", alpha, adapter.arch)
    return model
