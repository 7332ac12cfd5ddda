"""Microscaling float formats: MXFP4, MXFP8 (OCP Microscaling Formats spec v1.0) and NVFP4.

MX (``mxfp4``, ``mxfp8``, ``mxfp8:e5m2``): blocks of 32 consecutive inputs of a row share one E8M0 scale
``X = 2^(floor(log2 amax) - emax_elem)`` (the OCP rule; ``emax`` = 2 for E2M1, 8 for E4M3, 15 for E5M2; an all-zero
block gets ``X = 2^-127``); elements are ``P = elem(w / X)``, rounded to nearest-even and saturated to the element's
max normal (OCP leaves overflow to the implementation; ``amax / X`` lies in [2^emax, 2^(emax+1)), so the top of each
block can clip, e.g. at +-6 for E2M1). ``w_hat = X * P``.

NVFP4 (``nvfp4``; as in vllm-project/compressed-tensors): a per-tensor fp32 ``g = 448 * 6 / amax(W)`` (1 when W is
zero), blocks of 16 with an E4M3 scale ``s_b = e4m3(amax_b / 6 * g)`` (a zero ``s_b`` becomes the smallest E4M3
subnormal 2^-9) and E2M1 elements ``P = e2m1(w / (s_b / g))``; ``w_hat = P * (s_b / g)`` with ``s_b / g`` in fp32.

Stored: E2M1 codes packed two per byte (low nibble first, :mod:`.packing`) or float8 codes ``[out, in]``; MX scales
as uint8 E8M0 codes ``[out, in/32]`` (bit-identical to ``torch.float8_e8m0fnu``); NVFP4 scales as
``float8_e4m3fn [out, in/16]`` plus ``global_scale`` float32 ``[1]``. Limits: the block must divide ``in_features``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .floatcodec import (EMAX, FP8_DTYPES, decode_e2m1, decode_e8m0, encode_e2m1, encode_e8m0, encode_fp8,
                         floor_log2)
from .grouped import group_reason
from .packing import pack_codes, packed_row_bytes, unpack_codes

_ELEMS = ("e2m1", "e4m3", "e5m2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MXFP(Format):
    family: ClassVar[str] = "mxfp"
    element: str = "e2m1"
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.element not in _ELEMS:
            raise ConfigError(f"MXFP.element must be one of {_ELEMS}, got {self.element!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"MXFP.block_size must be a positive integer, got {self.block_size!r}")

    @property
    def element_bits(self) -> int:
        return 4 if self.element == "e2m1" else 8

    def supports(self, shape: Shape) -> str | None:
        return group_reason(shape[1], self.block_size, self.spec())

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return out * packed_row_bytes(inp, self.element_bits) + out * (inp // self.block_size)

    def spec(self) -> str:
        s = "mxfp4" if self.element == "e2m1" else "mxfp8" + ("" if self.element == "e4m3" else ":e5m2")
        return s + ("" if self.block_size == 32 else f":b{self.block_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NVFP4(Format):
    family: ClassVar[str] = "nvfp"
    block_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"NVFP4.block_size must be a positive integer, got {self.block_size!r}")

    def supports(self, shape: Shape) -> str | None:
        return group_reason(shape[1], self.block_size, self.spec())

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return out * packed_row_bytes(inp, 4) + out * (inp // self.block_size) + 4

    def spec(self) -> str:
        return "nvfp4" + ("" if self.block_size == 16 else f":b{self.block_size}")


_MX = re.compile(r"^mxfp(4|8)(?::(e4m3|e5m2))?(?::b(\d+))?$")
_NV = re.compile(r"^nvfp4(?::b(\d+))?$")


def parse_mx(spec: str) -> MXFP:
    m = _MX.match(spec)
    if not m or (m.group(1) == "4" and m.group(2)):
        raise FormatError(f"cannot parse MX format {spec!r}; expected mxfp4, mxfp8, mxfp8:e5m2 (optionally :b<block>)")
    element = "e2m1" if m.group(1) == "4" else (m.group(2) or "e4m3")
    return MXFP(element=element, block_size=int(m.group(3) or 32))


def parse_nvfp4(spec: str) -> NVFP4:
    m = _NV.match(spec)
    if not m:
        raise FormatError(f"cannot parse NVFP4 format {spec!r}; expected nvfp4 (optionally :b<block>)")
    return NVFP4(block_size=int(m.group(1) or 16))


def _elements(codes: torch.Tensor, element: str, shape: Shape) -> torch.Tensor:
    out, inp = shape
    if element == "e2m1":
        return decode_e2m1(unpack_codes(codes, 4, inp))
    return codes.float()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class MXFPWeight(CompressedWeight):
    format: MXFP
    codes: torch.Tensor  # uint8 [out, in/2] (E2M1) or float8 [out, in]
    scales: torch.Tensor  # uint8 E8M0 codes [out, in/block]

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        b = self.format.block_size
        p = _elements(self.codes, self.format.element, self.shape).reshape(out, inp // b, b)
        return (p * decode_e8m0(self.scales).unsqueeze(-1)).reshape(out, inp).to(dtype)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class NVFP4Weight(CompressedWeight):
    format: NVFP4
    codes: torch.Tensor  # uint8 [out, in/2]
    scales: torch.Tensor  # float8_e4m3fn [out, in/16]
    global_scale: torch.Tensor  # float32 [1]

    def block_scales(self) -> torch.Tensor:
        """The effective fp32 scale of every block, ``s_b / g``."""
        return self.scales.float() / self.global_scale.float()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        b = self.format.block_size
        p = decode_e2m1(unpack_codes(self.codes, 4, inp)).reshape(out, inp // b, b)
        return (p * self.block_scales().unsqueeze(-1)).reshape(out, inp).to(dtype)


register_weight_class(MXFP, MXFPWeight)
register_weight_class(NVFP4, NVFP4Weight)


def mx_scale_exponent(amax: torch.Tensor, element: str) -> torch.Tensor:
    """The OCP shared exponent ``floor(log2 amax) - emax`` (int64), -127 for an all-zero block."""
    e = floor_log2(torch.where(amax > 0, amax, torch.ones_like(amax))) - EMAX[element]
    return torch.where(amax > 0, e, torch.full_like(e, -127)).clamp(-127, 127)


def _encode_elements(x: torch.Tensor, element: str) -> torch.Tensor:
    if element == "e2m1":
        return encode_e2m1(x)
    return encode_fp8(x, element)


def quantize_mx(w: torch.Tensor, fmt: MXFP) -> MXFPWeight:
    out, inp = w.shape
    b = fmt.block_size
    blocks = w.float().reshape(out, inp // b, b)
    scales = encode_e8m0(mx_scale_exponent(blocks.abs().amax(-1), fmt.element))
    x = blocks / decode_e8m0(scales).unsqueeze(-1)
    elems = _encode_elements(x, fmt.element).reshape(out, inp)
    codes = pack_codes(elems, 4) if fmt.element == "e2m1" else elems
    cw = MXFPWeight(format=fmt, shape=(out, inp), codes=codes, scales=scales)
    cw.validate()
    return cw


def nvfp4_global_scale(amax: float) -> float:
    g = 448.0 * 6.0 / amax if amax > 0 else 1.0
    return g if torch.isfinite(torch.tensor(g)) else 1.0


def quantize_nvfp4(w: torch.Tensor, fmt: NVFP4) -> NVFP4Weight:
    out, inp = w.shape
    b = fmt.block_size
    blocks = w.float().reshape(out, inp // b, b)
    g = torch.tensor([nvfp4_global_scale(float(w.detach().abs().max()))], dtype=torch.float32, device=w.device)
    sb = encode_fp8(blocks.abs().amax(-1) / 6.0 * g, "e4m3").float()
    sb = torch.where(sb > 0, sb, torch.full_like(sb, 2.0**-9)).to(FP8_DTYPES["e4m3"])  # exact: both representable
    eff = sb.float() / g
    codes = pack_codes(encode_e2m1(blocks / eff.unsqueeze(-1)).reshape(out, inp), 4)
    cw = NVFP4Weight(format=fmt, shape=(out, inp), codes=codes, scales=sb, global_scale=g)
    cw.validate()
    return cw


from .registry import register_format  # noqa: E402 - registration after the definitions

register_format("mxfp", MXFP, parse_mx)
register_format("nvfp", NVFP4, parse_nvfp4)
