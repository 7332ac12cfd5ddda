"""FP8 weights (OCP OFP8 E4M3 / E5M2) with one float32 scale per output channel or per block of inputs.

Equation: per row (``fp8:e4m3``) or per group of ``g`` consecutive inputs of a row (``fp8:e4m3:g128``),
``s = max|w| / fp8_max`` (fp32; a zero group gets ``s = 1``) and ``c = fp8(w / s)`` with a saturating round-to-nearest-
even cast (:mod:`.floatcodec`); ``w_hat = float(c) * s``.

Stored: ``codes`` ``[out, in]`` as ``torch.float8_e4m3fn`` / ``float8_e5m2`` (1 byte each) and ``scales``
``[out, n_groups]`` float32. Limits: the group must divide ``in_features``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .grouped import Grouped, check_group_size, group_reason  # noqa: F401 (re-exported)
from .base import CompressedWeight, Format, Shape, register_weight_class
from .floatcodec import FP8_DTYPES, FP8_MAX, encode_fp8


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8(Grouped, Format):
    family: ClassVar[str] = "fp8"
    kind: str = "e4m3"
    group_size: int | None = None  # None: one scale per output channel

    def __post_init__(self) -> None:
        if self.kind not in FP8_DTYPES:
            raise ConfigError(f"FP8.kind must be one of {sorted(FP8_DTYPES)}, got {self.kind!r}")
        check_group_size("FP8", self.group_size)



    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return out * inp + out * (inp // self.group(inp)) * 4

    def spec(self) -> str:
        return f"fp8:{self.kind}" + ("" if self.group_size is None else f":g{self.group_size}")


_SPEC = re.compile(r"^fp8(?::(e4m3|e5m2))?(?::(g\d+|pc))?$")


def parse_fp8(spec: str) -> FP8:
    m = _SPEC.match(spec)
    if not m:
        raise FormatError(f"cannot parse fp8 format {spec!r}; expected fp8:e4m3|fp8:e5m2[:g<size>|:pc]")
    g = m.group(2)
    return FP8(kind=m.group(1) or "e4m3", group_size=None if g in (None, "pc") else int(g[1:]))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class FP8Weight(CompressedWeight):
    format: FP8
    codes: torch.Tensor  # float8 [out, in]
    scales: torch.Tensor  # float32 [out, n_groups]

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        g = self.format.group(inp)
        w = self.codes.float().reshape(out, inp // g, g) * self.scales.float().unsqueeze(-1)
        return w.reshape(out, inp).to(dtype)


register_weight_class(FP8, FP8Weight)


def quantize_fp8(w: torch.Tensor, fmt: FP8) -> FP8Weight:
    out, inp = w.shape
    g = fmt.group(inp)
    groups = w.float().reshape(out, inp // g, g)
    amax = groups.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX[fmt.kind], torch.ones_like(amax))
    codes = encode_fp8(groups / scale.unsqueeze(-1), fmt.kind).reshape(out, inp)
    cw = FP8Weight(format=fmt, shape=(out, inp), codes=codes, scales=scale.contiguous())
    cw.validate()
    return cw


from .registry import register_format  # noqa: E402 - registration after the definitions

register_format("fp", FP8, parse_fp8)
