"""NF4: the 4-bit NormalFloat codebook of QLoRA (Dettmers et al., 2023; bitsandbytes), absmax-scaled per group.

Equation: per group of ``g`` inputs of a row, ``s = max|w|`` (rounded to the stored fp16 scale; a zero group gets
``s = 1``), ``c = argmin_k |w / s - NF4[k]|`` and ``w_hat = NF4[c] * s``. The 16 levels (bitsandbytes' table) are the
quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero; they are asymmetric (8 positive, 7 negative levels).

Stored: codes packed two per byte ``[out, in/2]`` uint8 and ``scales`` ``[out, n_groups]`` fp16. No double
quantization of the scales (bitsandbytes' option). Limits: the group must divide ``in_features``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .grouped import Grouped, check_group_size
from .packing import pack_codes, packed_row_bytes, unpack_codes

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4(Grouped, Format):
    family: ClassVar[str] = "nf"
    group_size: int | None = 64
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        check_group_size("NF4", self.group_size)
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"NF4.scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")



    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return out * packed_row_bytes(inp, 4) + out * (inp // self.group(inp)) * _SCALE_DTYPES[self.scale_dtype].itemsize

    def spec(self) -> str:
        s = "nf4:" + ("pc" if self.group_size is None else f"g{self.group_size}")
        return s + ("" if self.scale_dtype == "float16" else f":{self.scale_dtype}")


_SPEC = re.compile(r"^nf4(?::(g\d+|pc))?(?::(float16|bfloat16|float32))?$")


def parse_nf4(spec: str) -> NF4:
    m = _SPEC.match(spec)
    if not m:
        raise FormatError(f"cannot parse NF4 format {spec!r}; expected nf4[:g<size>|:pc][:float32]")
    g = m.group(1) or "g64"
    return NF4(group_size=None if g == "pc" else int(g[1:]), scale_dtype=m.group(2) or "float16")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class NF4Weight(CompressedWeight):
    format: NF4
    codes: torch.Tensor  # uint8 [out, in/2]
    scales: torch.Tensor  # scale_dtype [out, n_groups]

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        g = self.format.group(inp)
        v = NF4_LEVELS.to(self.codes.device)[unpack_codes(self.codes, 4, inp)].reshape(out, inp // g, g)
        return (v * self.scales.float().unsqueeze(-1)).reshape(out, inp).to(dtype)


register_weight_class(NF4, NF4Weight)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``levels`` for every element of ``x`` (ties go to the lower level)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.searchsorted(mids.to(x.device), x.contiguous(), right=False)


def quantize_nf4(w: torch.Tensor, fmt: NF4) -> NF4Weight:
    out, inp = w.shape
    g = fmt.group(inp)
    groups = w.float().reshape(out, inp // g, g)
    amax = groups.abs().amax(-1)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)).to(_SCALE_DTYPES[fmt.scale_dtype])
    scale = torch.where(scale.float() > 0, scale.float(), torch.ones_like(amax))  # fp16 underflow guard
    codes = nearest_level(groups / scale.unsqueeze(-1), NF4_LEVELS).reshape(out, inp)
    cw = NF4Weight(format=fmt, shape=(out, inp), codes=pack_codes(codes, 4),
                   scales=scale.to(_SCALE_DTYPES[fmt.scale_dtype]).contiguous())
    cw.validate()
    return cw


from .registry import register_format  # noqa: E402 - registration after the definitions

register_format("nf", NF4, parse_nf4)
