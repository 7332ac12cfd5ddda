"""Opt-in FP8 x FP8 multiply through ``torch._scaled_mm`` (H100 FP8 tensor cores) for per-channel ``fp8:e4m3``.

Unlike every other kernel here this is *not* a weight-only path: it quantizes the activations too (per row,
``s_x = max|x_row| / 448``, E4M3 round-to-nearest, saturating), so its result differs from ``x @ decode()^T`` by
the activation rounding (a few percent relative, far above the kernels' 1e-3 contract). The dispatcher never
picks it; call :func:`fp8_scaled_mm_linear` yourself (or time it with ``bench/kernels.py --new-formats``).

``y = (x_q s_x) (W_q s_w)^T = s_x s_w^T * (x_q W_q^T)``: ``_scaled_mm`` with row-wise scales ``scale_a [M, 1]`` and
``scale_b [1, N]`` (fp32) and the stored E4M3 codes as ``b = W_q^T`` (a column-major view, no copy).
Limits: E4M3 with one scale per output channel (``fp8:e4m3``); ``in`` and ``out`` multiples of 16.
"""

from __future__ import annotations

import torch

from ..errors import FormatError

E4M3_MAX = 448.0


def scaled_mm_reason(cw) -> str | None:
    from ..formats.fp8 import FP8Weight

    if not isinstance(cw, FP8Weight) or cw.format.kind != "e4m3" or cw.format.group_size is not None:
        return f"_scaled_mm takes per-channel fp8:e4m3 weights, not {cw.format.spec()}"
    out, inp = cw.shape
    if inp % 16 or out % 16:
        return f"_scaled_mm needs in and out features divisible by 16, got {out}x{inp}"
    return None


def quantize_rows_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row E4M3 codes of ``x [M, K]`` and their fp32 scales ``[M, 1]`` (a zero row gets scale 1)."""
    amax = x.float().abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


def fp8_scaled_mm_linear(cw, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with FP8 activations (see the module note: *not* the weight-only result)."""
    reason = scaled_mm_reason(cw)
    if reason is not None:
        raise FormatError(reason)
    x2d = x.reshape(-1, x.shape[-1])
    xq, sx = quantize_rows_e4m3(x2d)
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    y = torch._scaled_mm(xq, cw.codes.t(), scale_a=sx, scale_b=cw.scales.float().reshape(1, -1).contiguous(),
                         out_dtype=out_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], cw.shape[0])
