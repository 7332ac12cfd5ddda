"""Bit-exact codecs of the small float types the micro-formats store.

- FP8 (OCP 8-bit floating point, "OFP8"): E4M3 (``torch.float8_e4m3fn``: bias 7, no infinities, max 448, one NaN
  pattern per sign) and E5M2 (``torch.float8_e5m2``: IEEE-like, bias 15, max 57344). torch's casts are exact and round
  to nearest-even; we clamp to the finite range first, so encoding *saturates* instead of producing NaN/Inf (the OCP
  "saturating" conversion mode).
- E8M0 (the OCP MX block scale): an unsigned biased exponent, value ``2^(code - 127)``, code 255 = NaN. Stored here as
  uint8 (bit-identical to ``torch.float8_e8m0fnu``) and decoded through that dtype.
- E2M1 (FP4, the MX/NV element): sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0; the 8 magnitudes are
  ``0, 0.5, 1, 1.5, 2, 3, 4, 6``. torch's ``float4_e2m1fn_x2`` has no CPU casts, so the codec is a 16-entry table.
  Encoding is round-to-nearest, ties to the even code (the IEEE rule), saturating at +-6.

Limits: encoders take float32 input; NaN inputs are not supported (methods reject non-finite weights first).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX: dict[str, float] = {"e4m3": 448.0, "e5m2": 57344.0}
# exponent of the largest normal (the OCP "emax" used by the MX scale rule)
EMAX: dict[str, int] = {"e2m1": 2, "e4m3": 8, "e5m2": 15}

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
E2M1_MAX = 6.0


def fp8_dtype(kind: str) -> torch.dtype:
    try:
        return FP8_DTYPES[kind]
    except KeyError:
        raise ConfigError(f"unknown fp8 kind {kind!r}; use one of {sorted(FP8_DTYPES)}") from None


def encode_fp8(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of ``x`` to the fp8 ``kind``."""
    m = FP8_MAX[kind]
    return x.float().clamp(-m, m).to(fp8_dtype(kind))


def decode_fp8(codes: torch.Tensor) -> torch.Tensor:
    return codes.float()


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float -> 4-bit E2M1 codes (int64 in 0..15), RNE with ties to the even code, saturating at +-6."""
    x = x.float()
    grid = E2M1_VALUES[:8].to(x.device)
    a = x.abs().clamp(max=E2M1_MAX)
    lo = (torch.searchsorted(grid, a.contiguous(), right=True) - 1).clamp(0, 7)
    hi = (lo + 1).clamp(max=7)
    d_lo = a - grid[lo]
    d_hi = grid[hi] - a
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (hi != lo))
    mag = torch.where(up, hi, lo)
    sign = (torch.signbit(x) & (mag > 0)).to(torch.int64)  # -0 is encoded as +0
    return mag + 8 * sign


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded onto the E2M1 grid (float32)."""
    return decode_e2m1(encode_e2m1(x))


def encode_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Unbiased integer exponents (clamped to the E8M0 range [-127, 127]) -> uint8 codes."""
    return (exponent.long().clamp(-127, 127) + 127).to(torch.uint8)


def decode_e8m0(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 powers of two (code 255 -> NaN)."""
    return codes.view(torch.float8_e8m0fnu).float()


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(x))`` for positive finite float32 ``x`` (via frexp: ``x = m 2^e``, ``m`` in [0.5, 1))."""
    _, e = torch.frexp(x.float())
    return e.long() - 1


def minifloat_value(code: int, *, exp_bits: int, man_bits: int, bias: int) -> float:
    """Spec value of a sign-exponent-mantissa code (normal and subnormal; no special values). For tests and docs."""
    sign = -1.0 if code >> (exp_bits + man_bits) & 1 else 1.0
    e = (code >> man_bits) & ((1 << exp_bits) - 1)
    m = code & ((1 << man_bits) - 1)
    if e == 0:
        return sign * (m / (1 << man_bits)) * 2.0 ** (1 - bias)
    return sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
