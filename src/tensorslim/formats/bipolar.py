"""Bipolar-INT bit planes (Ma et al., arXiv 2409.17870 / APT-LLM): every bit means -1 or +1.

Equation: an ``n``-bit bipolar integer is ``v = sum_{i<n} (2 x_i - 1) 2^i`` (odd values in ``[-(2^n-1), 2^n-1]``,
no zero). A weight group is ``w = scale * v + offset``. From an asymmetric integer weight ``w = s (c - z)`` with
``c`` in ``[0, 2^n)``: ``v = 2c - (2^n - 1)`` (the same bits), ``scale = s / 2``, ``offset = s ((2^n - 1)/2 - z)``;
with fp16 integer scales and float32 ``scale``/``offset`` the conversion is exact.

The product decomposes by planes, ``W x = sum_g scale_g sum_i 2^i (B_i x_g) + offset_g sum(x_g)`` with
``B_i`` in {-1, +1}; with +-1 activations too, ``sum (2b-1)(2c-1) = K - 2 popcount(b XOR c)`` (what 1-bit tensor
cores compute). :meth:`BipolarWeight.linear` runs the plane decomposition (a reference, not a fast kernel).

Stored: ``planes`` uint8 ``[n * out, ceil(in/8)]`` (as BCQ), ``scales`` and ``offsets`` float32 ``[out, n_groups]``.
Produced by RTN on the integer grid then converted (``bipolar4:g64``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .bcq import int_bitplanes, pack_planes, unpack_planes
from .grouped import Grouped, check_group_size
from .intgroup import IntGroup, IntGroupWeight, quantize_rtn
from .packing import packed_row_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bipolar(Grouped, Format):
    family: ClassVar[str] = "bipolar"
    bits: int
    group_size: int | None = 128

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"Bipolar.bits must be an integer in 1..8, got {self.bits!r}")
        check_group_size("Bipolar", self.group_size)



    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return self.bits * out * packed_row_bytes(inp, 1) + out * (inp // self.group(inp)) * 8

    def spec(self) -> str:
        return f"bipolar{self.bits}:" + ("pc" if self.group_size is None else f"g{self.group_size}")


_SPEC = re.compile(r"^bipolar([1-8])(?::(g\d+|pc))?$")


def parse_bipolar(spec: str) -> Bipolar:
    m = _SPEC.match(spec)
    if not m:
        raise FormatError(f"cannot parse bipolar format {spec!r}; expected bipolar<bits 1-8>[:g<size>|:pc]")
    g = m.group(2) or "g128"
    return Bipolar(bits=int(m.group(1)), group_size=None if g == "pc" else int(g[1:]))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BipolarWeight(CompressedWeight):
    format: Bipolar
    planes: torch.Tensor  # uint8 [n*out, in/8]
    scales: torch.Tensor  # float32 [out, n_groups]
    offsets: torch.Tensor  # float32 [out, n_groups]

    def values(self) -> torch.Tensor:
        """The bipolar integers ``v`` ``[out, in]`` (int64, odd)."""
        b = unpack_planes(self.planes, self.format.bits, self.shape)
        w = (1 << torch.arange(self.format.bits, device=b.device)).view(-1, 1, 1)
        return ((2 * b - 1) * w).sum(0)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        g = self.format.group(inp)
        v = self.values().float().reshape(out, inp // g, g)
        w = v * self.scales.float().unsqueeze(-1) + self.offsets.float().unsqueeze(-1)
        return w.reshape(out, inp).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Bit-plane product: ``sum_g scale_g sum_i 2^i (B_i x_g) + offset_g sum(x_g)`` in float32."""
        out, inp = self.shape
        g = self.format.group(inp)
        ng = inp // g
        xf = x.float().reshape(-1, ng, g)
        signs = unpack_planes(self.planes, self.format.bits, self.shape).float() * 2 - 1  # [n, out, in]
        acc = torch.zeros(xf.shape[0], out, ng, device=x.device)
        for i in range(self.format.bits):
            acc = acc + (2.0**i) * torch.einsum("tkg,okg->tok", xf, signs[i].reshape(out, ng, g))
        y = (acc * self.scales.float() + xf.sum(-1).unsqueeze(1) * self.offsets.float()).sum(-1)
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], out).to(x.dtype)


register_weight_class(Bipolar, BipolarWeight)


def bipolar_from_intgroup(iw: IntGroupWeight) -> BipolarWeight:
    """Exact bipolar form of an integer weight: ``decode`` equals ``iw.decode()`` bit for bit (fp16/bf16 scales)."""
    bits, s, z = int_bitplanes(iw)
    n = iw.format.bits
    fmt = Bipolar(bits=n, group_size=iw.format.group_size)
    cw = BipolarWeight(format=fmt, shape=iw.shape, planes=pack_planes(bits), scales=(s / 2).contiguous(),
                       offsets=(s * (((1 << n) - 1) / 2 - z)).contiguous())
    cw.validate()
    return cw


def quantize_bipolar(w: torch.Tensor, fmt: Bipolar) -> BipolarWeight:
    """RTN on the asymmetric integer grid of the same bits and group, then the exact conversion."""
    return bipolar_from_intgroup(quantize_rtn(w, IntGroup(bits=fmt.bits, group_size=fmt.group_size)))


def bipolar_dot(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum (2b-1)(2c-1)`` of 0/1 vectors via ``K - 2 popcount(b XOR c)`` (int64; last dim is K)."""
    return b.shape[-1] - 2 * (b.long() ^ c.long()).sum(-1)


from .registry import register_format  # noqa: E402 - registration after the definitions

register_format("bipolar", Bipolar, parse_bipolar)
