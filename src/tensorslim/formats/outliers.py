"""``SparseOutliers``: a few full-precision weights per row, kept beside a quantized base (``int3:g64+outliers:0.01``).

Used as the ``extra`` part of ``Sum(IntGroup, SparseOutliers)`` (QuantEase's outlier-aware variant, Behdin et al.
arXiv 2309.01885; SpQR-like). The matrix is ``W ~ decode(base) + S`` with ``S`` sparse.

Layout: a fixed budget of ``k = round(fraction * in)`` outliers *per output row* (the layer objective separates over
rows, so each row solves its own problem with the same budget; rows cannot trade budget). Stored:
``indices [out, k]`` (int16 when ``in <= 32767``, else int32; distinct within a row) and ``values [out, k]`` in
``value_dtype`` (fp16 default). So each outlier costs exactly 32 bits (int16 + fp16), e.g. 1% at 4 bits adds 0.32
bits per weight. No row pointers are needed because every row has ``k`` entries.

Spec: ``outliers:<fraction>[:<value_dtype>]`` (``outliers:0.01``, ``outliers:0.005:float32``).
Limits: ``decode`` scatters into a dense matrix; ``linear`` is the reference path (decode, then matmul).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class

_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= 32767 else torch.int32


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseOutliers(Format):
    family: ClassVar[str] = "outliers"
    fraction: float = 0.01
    value_dtype: str = "float16"

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 <= self.fraction <= 0.5:
            raise ConfigError(f"SparseOutliers.fraction must be a number in [0, 0.5], got {self.fraction!r}")
        if self.value_dtype not in _VALUE_DTYPES:
            raise ConfigError(f"SparseOutliers.value_dtype must be one of {sorted(_VALUE_DTYPES)}, got {self.value_dtype!r}")

    def per_row(self, in_features: int) -> int:
        return min(in_features, int(math.floor(self.fraction * in_features + 0.5)))

    @property
    def torch_value_dtype(self) -> torch.dtype:
        return _VALUE_DTYPES[self.value_dtype]

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        k = self.per_row(inp)
        return out * k * (index_dtype(inp).itemsize + self.torch_value_dtype.itemsize)

    def spec(self) -> str:
        s = f"outliers:{self.fraction:g}"
        return s if self.value_dtype == "float16" else f"{s}:{self.value_dtype}"


_SPEC = re.compile(r"^outliers:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(%?)(?::(float16|bfloat16|float32))?$")


def parse_outliers(spec: str) -> SparseOutliers:
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise FormatError(f"cannot parse outlier format {spec!r}; expected outliers:<fraction>[:float16|bfloat16|float32], "
                          "e.g. outliers:0.01 or outliers:1%")
    frac = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    return SparseOutliers(fraction=frac, value_dtype=m.group(3) or "float16")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SparseOutliersWeight(CompressedWeight):
    format: SparseOutliers
    indices: torch.Tensor  # int16/int32 [out, k]
    values: torch.Tensor  # value_dtype [out, k]

    def validate(self) -> None:
        super().validate()
        out, inp = self.shape
        k = self.format.per_row(inp)
        for name, dtype in (("indices", index_dtype(inp)), ("values", self.format.torch_value_dtype)):
            t = getattr(self, name)
            if tuple(t.shape) != (out, k) or t.dtype != dtype:
                raise ConfigError(f"SparseOutliersWeight {self.shape}: {name} should be {(out, k)} {dtype}, "
                                  f"got {tuple(t.shape)} {t.dtype}")
        if k:
            idx = self.indices.long()
            if int(idx.min()) < 0 or int(idx.max()) >= inp:
                raise ConfigError(f"SparseOutliersWeight {self.shape}: an index is outside 0..{inp - 1}")
            s = torch.sort(idx, dim=1).values
            if bool((s[:, 1:] == s[:, :-1]).any()):
                raise ConfigError(f"SparseOutliersWeight {self.shape}: repeated index within a row")
            if not bool(torch.isfinite(self.values).all()):
                raise ConfigError(f"SparseOutliersWeight {self.shape}: non-finite outlier values")

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        dense = torch.zeros(out, inp, dtype=torch.float32, device=self.values.device)
        dense.scatter_(1, self.indices.long(), self.values.float())
        return dense.to(dtype)


register_weight_class(SparseOutliers, SparseOutliersWeight)


def encode_outliers(fmt: SparseOutliers, s: torch.Tensor, indices: torch.Tensor) -> SparseOutliersWeight:
    """Store ``s [out, in]`` at ``indices [out, k]`` (values are read from ``s`` and rounded to ``value_dtype``)."""
    out, inp = s.shape
    idx = indices.long()
    w = SparseOutliersWeight(format=fmt, shape=(out, inp), indices=idx.to(index_dtype(inp)).contiguous(),
                             values=s.gather(1, idx).to(fmt.torch_value_dtype).contiguous())
    w.validate()
    return w


def _register() -> None:
    from .registry import register_format

    register_format("outliers", SparseOutliers, parse_outliers)


_register()
