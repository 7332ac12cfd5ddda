"""Ternary weights {-1, 0, +1} with an absmean scale (BitNet b1.58 / MatMul-free LM, Zhu et al. 2024, BitLinear).

Equation: ``s = mean|w|`` over the whole tensor (``ternary``) or over each group of ``g`` inputs of a row
(``ternary:g64``); a zero tensor/group gets ``s = 1``. ``t = clamp(round(w / s), -1, 1)``, ``w_hat = s * t``.
A product with ``t`` needs only additions and subtractions (then one multiply by ``s`` per group).

Stored: ``codes`` = ``t + 1`` packed at 2 bits (``[out, in/4]`` uint8; a 5-trits-per-byte packing would give 1.6 bits,
not done), per-tensor ``scales`` float32 ``[1]`` or per-group ``scales`` fp16 ``[out, n_groups]``.
Limits: post-training ternarization of an ordinary LLM destroys it (MatMul-free models are *trained* ternary); the
format is here so such models can be stored and measured.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .grouped import group_reason
from .packing import pack_codes, packed_row_bytes, unpack_codes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ternary(Format):
    family: ClassVar[str] = "ternary"
    group_size: int | None = None  # None: one scale for the whole tensor

    def __post_init__(self) -> None:
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"Ternary.group_size must be a positive integer or None (per tensor), got {self.group_size!r}")

    def supports(self, shape: Shape) -> str | None:
        return group_reason(shape[1], self.group_size, self.spec())

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        scales = 4 if self.group_size is None else out * (inp // self.group_size) * 2
        return out * packed_row_bytes(inp, 2) + scales

    def spec(self) -> str:
        return "ternary" + ("" if self.group_size is None else f":g{self.group_size}")


_SPEC = re.compile(r"^ternary(?::g(\d+))?$")


def parse_ternary(spec: str) -> Ternary:
    m = _SPEC.match(spec)
    if not m:
        raise FormatError(f"cannot parse ternary format {spec!r}; expected ternary or ternary:g<size>")
    return Ternary(group_size=int(m.group(1)) if m.group(1) else None)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TernaryWeight(CompressedWeight):
    format: Ternary
    codes: torch.Tensor  # uint8 [out, in/4], t + 1 at 2 bits
    scales: torch.Tensor  # float32 [1] or float16 [out, n_groups]

    def trits(self) -> torch.Tensor:
        """The ternary matrix ``t`` in {-1, 0, 1} (int64 ``[out, in]``)."""
        return unpack_codes(self.codes, 2, self.shape[1]) - 1

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        t = self.trits().float()
        if self.format.group_size is None:
            return (t * self.scales.float()).to(dtype)
        g = self.format.group_size
        return (t.reshape(out, inp // g, g) * self.scales.float().unsqueeze(-1)).reshape(out, inp).to(dtype)


register_weight_class(Ternary, TernaryWeight)


def quantize_ternary(w: torch.Tensor, fmt: Ternary) -> TernaryWeight:
    out, inp = w.shape
    w = w.float()
    if fmt.group_size is None:
        s = w.abs().mean().reshape(1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        t = torch.clamp(torch.round(w / s), -1, 1)
        scales = s.float()
    else:
        g = fmt.group_size
        groups = w.reshape(out, inp // g, g)
        s = groups.abs().mean(-1).to(torch.float16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        t = torch.clamp(torch.round(groups / s.unsqueeze(-1)), -1, 1).reshape(out, inp)
        scales = s.to(torch.float16)
    cw = TernaryWeight(format=fmt, shape=(out, inp), codes=pack_codes((t + 1).long(), 2), scales=scales.contiguous())
    cw.validate()
    return cw


from .registry import register_format  # noqa: E402 - registration after the definitions

register_format("ternary", Ternary, parse_ternary)
