"""Activation quantization as a runtime mode (fake quantization): W4A8, W4A4 (with QuaRot rotation), A-fp8.

Equations (per token, i.e. over the last dimension of a linear's input):
- ``int<b>``: symmetric, ``s = clip * max|x| / (2^(b-1) - 1)``, ``x_hat = clamp(round(x / s), -(2^(b-1)-1), 2^(b-1)-1) s``
  (QuaRot's activation quantizer; ``clip`` < 1 clips outliers, QuaRot uses 0.9 for A4);
- ``fp8``: ``s = max|x| / 448``, ``x_hat = e4m3(x / s) s``.
The linear then runs on ``x_hat`` (its weight may itself be compressed). This emulates the numerics of an integer or
fp8 GEMM; it is not a speedup on this CPU.

W4A4 recipe: :func:`~tensorslim.transforms.hadamard.apply_rotation` (residual + per-head + online MLP rotations),
then compress the weights (e.g. ``rtn int4``), then :func:`apply_activation_quant` with ``"int4"``. Without the
rotation, per-token outlier channels dominate the 4-bit scale.

:class:`QuantIO` wraps one module: an optional input quantizer (here) and an optional output quantizer
(:mod:`.kvcache` uses it on ``k_proj`` / ``v_proj``). Wrapping is done after compression (the runner expects plain
linears); wrapping twice updates the existing wrapper.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..formats.floatcodec import encode_fp8
from ..models.adapter import ModelAdapter

__all__ = ["ActQuant", "QuantIO", "apply_activation_quant", "quantize_per_token", "wrap_io"]

logger = logging.getLogger(__name__)

Quantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActQuant:
    """Per-token activation quantizer spec: ``kind`` is ``int8``, ``int4`` (any ``int2..int8``) or ``fp8``."""

    kind: str = "int8"
    clip: float = 1.0

    def __post_init__(self) -> None:
        if not (self.kind == "fp8" or (self.kind.startswith("int") and self.kind[3:].isdigit()
                                       and 2 <= int(self.kind[3:]) <= 8)):
            raise ConfigError(f"ActQuant.kind must be int2..int8 or fp8, got {self.kind!r}")
        if not 0 < self.clip <= 1:
            raise ConfigError(f"ActQuant.clip must be in (0, 1], got {self.clip!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_per_token(x, self.kind, self.clip)


def quantize_per_token(x: torch.Tensor, kind: str, clip: float = 1.0) -> torch.Tensor:
    """Fake-quantize ``x`` per token (last dim); computed in float32, returned in ``x.dtype``."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) * clip
    if kind == "fp8":
        s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        return (encode_fp8(xf / s, "e4m3").float() * s).to(x.dtype)
    qmax = (1 << (int(kind[3:]) - 1)) - 1
    s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return (torch.clamp(torch.round(xf / s), -qmax, qmax) * s).to(x.dtype)


class QuantIO(nn.Module):
    """``out_quant(inner(in_quant(x)))``: a module with quantized input and/or output (runtime emulation)."""

    def __init__(self, inner: nn.Module, in_quant: Quantizer | None = None, out_quant: Quantizer | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.in_quant = in_quant
        self.out_quant = out_quant

    @property
    def weight(self) -> torch.Tensor:  # what attention code may read (dtype/device); the dense or decoded weight
        inner = self.inner
        return inner.weight if hasattr(inner, "weight") else inner.compressed.decode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_quant is not None:
            x = self.in_quant(x)
        y = self.inner(x)
        return y if self.out_quant is None else self.out_quant(y)

    def extra_repr(self) -> str:
        return f"in_quant={self.in_quant}, out_quant={self.out_quant}"


def wrap_io(block: nn.Module, name: str, *, in_quant: Quantizer | None = None,
            out_quant: Quantizer | None = None) -> QuantIO:
    """Wrap ``block.<name>`` in a :class:`QuantIO` (or update the existing wrapper); returns the wrapper."""
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    module = getattr(parent, child)
    if not isinstance(module, QuantIO):
        module = QuantIO(module)
        setattr(parent, child, module)
    if in_quant is not None:
        module.in_quant = in_quant
    if out_quant is not None:
        module.out_quant = out_quant
    return module


def unwrapped(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, QuantIO) else module


def apply_activation_quant(model: nn.Module, adapter: ModelAdapter, kind: str | int = "int8", *,
                           clip: float = 1.0) -> nn.Module:
    """Quantize the input of every block linear per token (``kind``: ``int8``, ``int4``, ``8``, ``4``, ``fp8``).

    In place; returns ``model``. Apply after weight compression; for W4A4 rotate first (see the module note).
    """
    q = ActQuant(kind=f"int{kind}" if isinstance(kind, int) else kind, clip=clip)
    n = 0
    for block in adapter.get_blocks(model):
        for group in adapter.linear_groups:
            for name in group:
                wrap_io(block, name, in_quant=q)
                n += 1
    logger.info("activation quantization %s (clip %.2f) on %d linears", q.kind, clip, n)
    return model
