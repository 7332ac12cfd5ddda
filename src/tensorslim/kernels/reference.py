"""Reference multiplies: what every kernel is checked against and what runs where no kernel applies.

``reference_linear`` is the library's definition of ``CompressedWeight.linear``: decode the dense matrix in the
activation dtype, then ``F.linear``. ``reference_fp32`` is the test oracle: ``x @ decode()^T`` entirely in fp32 (the
kernels accumulate in fp32 and must match it to accumulation-order error).
"""

from __future__ import annotations

import torch

from ..formats.base import CompressedWeight


def reference_linear(cw: CompressedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = cw.decode(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def reference_fp32(cw: CompressedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = cw.decode(torch.float32).to(x.device)
    return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` in float64 (NaN or Inf anywhere in ``y`` gives ``inf``)."""
    y64, r64 = y.double(), ref.double()
    if not torch.isfinite(y64).all():
        return float("inf")
    return float((y64 - r64).norm() / r64.norm().clamp_min(1e-300))
