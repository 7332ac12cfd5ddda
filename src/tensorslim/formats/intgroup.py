"""Uniform integer quantization in groups along the input dimension (``IntGroup``).

Grid (the GPTQ / llm-compressor convention, so numbers compare with theirs): per group of ``g`` consecutive inputs of
one output row,
- asymmetric: ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)`` clamped to
  ``[0, 2^b - 1]``;
- symmetric: ``s = max|w| / ((2^b - 1) / 2)``, ``z = 2^(b-1)`` (implicit, not stored);
and ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w_hat = (q - z) * s``. A group whose range is zero gets ``s`` as if
its range were [-1, 1] (any scale reproduces zeros exactly).

Stored: ``codes`` (packed, see :mod:`.packing`), ``scales`` ``[out, n_groups]`` in ``scale_dtype`` (fp16 default),
``zeros`` (asymmetric only, packed at ``bits`` bits), and with act-order ``perm`` (int16/int32, the input order the
groups were formed in: codes are laid out for ``W[:, perm]``). Codes are always computed against the *stored*
(rounded) scale, so ``decode`` reproduces exactly what a solver evaluated.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError, NumericalError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .packing import pack_codes, packed_row_bytes, unpack_codes

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntGroup(Format):
    """``bits``-bit integers, one scale (and zero point unless symmetric) per ``group_size`` inputs of a row.

    ``group_size=None`` means one group per row (per-channel).
    """

    family: ClassVar[str] = "int"
    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    act_order: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"IntGroup.bits must be an integer in 1..8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"IntGroup.group_size must be a positive integer or None (per-channel), got {self.group_size!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"IntGroup.scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.symmetric and self.bits == 1:
            raise ConfigError("IntGroup: 1-bit symmetric has no zero level; use symmetric=False or the bcq/binary formats")

    # -- spec --------------------------------------------------------------------------------------------------------
    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def group(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def n_groups(self, in_features: int) -> int:
        return in_features // self.group(in_features)

    def supports(self, shape: Shape) -> str | None:
        out, inp = shape
        if self.group_size is not None and inp % self.group_size:
            divisors = [g for g in (256, 128, 64, 32, 16) if inp % g == 0]
            fix = f"use group {' or '.join(map(str, divisors[:2]))}" if divisors else "use per-channel (int{b}:pc)"
            return f"{inp} is not divisible by group {self.group_size}; {fix.format(b=self.bits)}, or ignore the layer"
        return None

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        ng = self.n_groups(inp)
        n = out * packed_row_bytes(inp, self.bits) + out * ng * self.torch_scale_dtype.itemsize
        if not self.symmetric:
            n += out * packed_row_bytes(ng, self.bits)
        if self.act_order:
            n += inp * perm_dtype(inp).itemsize
        return n

    def spec(self) -> str:
        s = f"int{self.bits}:" + ("pc" if self.group_size is None else f"g{self.group_size}")
        if self.symmetric:
            s += ":sym"
        if self.act_order:
            s += ":act"
        if self.scale_dtype != "float16":
            s += f":{self.scale_dtype}"
        return s


_SPEC = re.compile(r"^int([1-8])(?::(g\d+|pc))?((?::(?:sym|asym|act|float16|bfloat16|float32))*)$")


def parse_intgroup(spec: str) -> IntGroup:
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise FormatError(
            f"cannot parse integer format {spec!r}; expected int<bits 1-8>[:g<size>|:pc][:sym][:act], e.g. int4:g64"
        )
    bits, gran, flags = int(m.group(1)), m.group(2) or "g128", [f for f in m.group(3).split(":") if f]
    group = None if gran == "pc" else int(gran[1:])
    dtype = next((f for f in flags if f in _SCALE_DTYPES), "float16")
    return IntGroup(bits=bits, group_size=group, symmetric="sym" in flags, act_order="act" in flags, scale_dtype=dtype)


def perm_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 32767 else torch.int32


# -- the grid, as pure functions solvers share ---------------------------------------------------------------------
def fit_scale_zero(w: torch.Tensor, fmt: IntGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of each row of ``w`` (``[..., g]`` -> scale, zero of shape ``[...]``).

    The scale is rounded to the stored dtype and returned in float32; the zero is an integer-valued float32.
    """
    w = w.float()
    if fmt.symmetric:
        amax = w.abs().amax(-1)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = amax / (fmt.maxq / 2)
        zero = torch.full_like(scale, float(1 << (fmt.bits - 1)))
    else:
        lo = w.amin(-1).clamp(max=0)
        hi = w.amax(-1).clamp(min=0)
        flat = hi == lo
        lo = torch.where(flat, -torch.ones_like(lo), lo)
        hi = torch.where(flat, torch.ones_like(hi), hi)
        scale = (hi - lo) / fmt.maxq
        zero = None
    scale = store_scale(scale, fmt)
    if zero is None:
        zero = torch.round(-lo / scale).clamp(0, fmt.maxq)
    return scale, zero


def store_scale(scale: torch.Tensor, fmt: IntGroup) -> torch.Tensor:
    """Round scales to the stored dtype (float32 result); refuse values the dtype cannot hold."""
    stored = scale.to(fmt.torch_scale_dtype)
    if not torch.isfinite(stored).all():
        raise NumericalError(
            f"a group scale overflows {fmt.scale_dtype} (max |scale| {float(scale.abs().max()):.3g}); "
            "use scale_dtype float32 (':float32') or check the weights"
        )
    stored = stored.float()
    # A scale that underflows to zero would divide by zero; the smallest positive value keeps codes finite.
    tiny = torch.finfo(fmt.torch_scale_dtype).smallest_normal
    return torch.where(stored > 0, stored, torch.full_like(stored, tiny))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of ``w`` (``[..., g]``) on the grid given per row by ``scale``/``zero`` (``[...]``)."""
    return torch.clamp(torch.round(w.float() / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class IntGroupWeight(CompressedWeight):
    format: IntGroup
    codes: torch.Tensor  # uint8 [out, ceil(in*bits/8)]
    scales: torch.Tensor  # scale_dtype [out, n_groups]
    zeros: torch.Tensor | None = None  # uint8 [out, ceil(n_groups*bits/8)], asymmetric only
    perm: torch.Tensor | None = None  # int16/int32 [in], act-order only

    @classmethod
    def from_codes(
        cls,
        fmt: IntGroup,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        perm: torch.Tensor | None = None,
    ) -> "IntGroupWeight":
        """Pack integer ``codes [out, in]`` with per-group ``scale``/``zero`` ``[out, n_groups]`` (float)."""
        out, inp = codes.shape
        if (perm is not None) != fmt.act_order:
            raise ConfigError(f"{fmt.spec()}: a permutation is stored exactly when act_order is set")
        w = cls(
            format=fmt,
            shape=(out, inp),
            codes=pack_codes(codes, fmt.bits),
            scales=scale.to(fmt.torch_scale_dtype).contiguous(),
            zeros=None if fmt.symmetric else pack_codes(zero.round().to(torch.int64), fmt.bits),
            perm=None if perm is None else perm.to(perm_dtype(inp)).contiguous(),
        )
        w.validate()
        return w

    def validate(self) -> None:
        super().validate()
        out, inp = self.shape
        fmt = self.format
        ng = fmt.n_groups(inp)
        want = {"codes": ((out, packed_row_bytes(inp, fmt.bits)), torch.uint8), "scales": ((out, ng), fmt.torch_scale_dtype)}
        if not fmt.symmetric:
            want["zeros"] = ((out, packed_row_bytes(ng, fmt.bits)), torch.uint8)
        if fmt.act_order:
            want["perm"] = ((inp,), perm_dtype(inp))
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ConfigError(f"IntGroupWeight {fmt.spec()} {self.shape}: {name} should be {shape} {dtype}, got {got}")
        if self.perm is not None:
            p = self.perm.long()
            if not torch.equal(torch.sort(p).values, torch.arange(inp, device=p.device)):
                raise ConfigError(f"IntGroupWeight {fmt.spec()}: perm is not a permutation of 0..{inp - 1}")

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes ``[out, in]`` (int64, stored order) and float32 scale / zero ``[out, n_groups]``."""
        out, inp = self.shape
        fmt = self.format
        codes = unpack_codes(self.codes, fmt.bits, inp)
        scale = self.scales.float()
        if fmt.symmetric:
            zero = torch.full_like(scale, float(1 << (fmt.bits - 1)))
        else:
            zero = unpack_codes(self.zeros, fmt.bits, fmt.n_groups(inp)).float()
        return codes, scale, zero

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        codes, scale, zero = self.unpacked()
        g = self.format.group(inp)
        w = dequantize(codes.reshape(out, inp // g, g), scale, zero).reshape(out, inp)
        if self.perm is not None:
            inv = torch.empty_like(self.perm, dtype=torch.long)
            inv[self.perm.long()] = torch.arange(inp, device=w.device)
            w = w[:, inv]
        return w.to(dtype)


register_weight_class(IntGroup, IntGroupWeight)


def quantize_rtn(w: torch.Tensor, fmt: IntGroup, perm: torch.Tensor | None = None) -> IntGroupWeight:
    """Round-to-nearest on the min-max grid: the reference every solver is compared with."""
    out, inp = w.shape
    wp = w if perm is None else w[:, perm]
    g = fmt.group(inp)
    groups = wp.float().reshape(out, inp // g, g)
    scale, zero = fit_scale_zero(groups, fmt)
    codes = quantize_codes(groups, scale, zero, fmt.maxq).reshape(out, inp).to(torch.int64)
    return IntGroupWeight.from_codes(fmt, codes, scale, zero, perm)
