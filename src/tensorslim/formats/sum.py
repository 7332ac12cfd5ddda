"""``Sum(base, extra)``: a matrix stored as the sum of two compressed parts, ``W ~ decode(base) + decode(extra)``.

Used for a quantized base plus a low-rank correction (EoRA), a quantized base plus full-precision sparse outliers
(QuantEase-outlier, SpQR-like), and any other pair. ``nbytes`` is the sum of the parts' bytes; ``linear`` adds the
two parts' outputs (so each part can use its own kernel).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sum(Format):
    family: ClassVar[str] = "sum"
    base: Format
    extra: Format

    def __post_init__(self) -> None:
        if not isinstance(self.base, Format) or not isinstance(self.extra, Format):
            raise FormatError("Sum(base, extra) takes two formats")

    def nbytes(self, shape: Shape) -> int:
        return self.base.nbytes(shape) + self.extra.nbytes(shape)

    def supports(self, shape: Shape) -> str | None:
        return self.base.supports(shape) or self.extra.supports(shape)

    def spec(self) -> str:
        return f"{self.base.spec()}+{self.extra.spec()}"


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SumWeight(CompressedWeight):
    format: Sum
    base: CompressedWeight
    extra: CompressedWeight

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.base.decode(torch.float32) + self.extra.decode(torch.float32)).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel for e.g. int4 + low-rank where registered
            from ..kernels.dispatch import kernel_linear, kernel_reason

            if kernel_reason(self, x) is None:
                return kernel_linear(self, x, bias)
        return self.base.linear(x, bias) + self.extra.linear(x, None)

    @classmethod
    def _part_format(cls, fmt: Format, shape: Shape, part: str) -> tuple[Format, Shape]:
        assert isinstance(fmt, Sum)
        return getattr(fmt, part), shape


register_weight_class(Sum, SumWeight)
