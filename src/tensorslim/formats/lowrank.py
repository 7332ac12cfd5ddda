"""``LowRank``: a matrix stored as two thin factors, ``W ~ U V`` with ``U [out, r]`` and ``V [r, in]``.

Produced by the weighted low-rank routine (:mod:`tensorslim.methods.lowrank`: plain, activation-whitened and
Fisher-weighted SVD, EoRA). The multiply never forms the dense matrix: ``y = (x V^T) U^T``, two GEMMs costing
``r (in + out)`` MACs per token instead of ``in * out``.

Spec: ``lowrank:r64`` (a fixed rank) or ``lowrank:0.3`` (a request for a 30% parameter reduction whose per-layer
ranks a method resolves; see :meth:`LowRank.resolve`), optionally ``:float32`` / ``:bfloat16`` for the factor dtype.
Stored: ``u`` and ``v`` in ``dtype`` (float16 by default: the deploy dtype of the models tensorslim targets, so
``bits_per_weight`` counts 16 bits per factor entry; float32 is available where the factors feed a second stage).
A compressed weight always carries a fixed rank; a reduction spec is resolved before encoding. For a reduction spec
``nbytes`` counts the uniform per-matrix rank (the estimate a plan uses before a global allocation).
Limits: ``1 <= rank <= min(out, in)``; the rank must be below ``out*in/(out+in)`` to save memory (not enforced:
EoRA corrections are additions, not replacements).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class

FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def uniform_rank(shape: Shape, reduction: float) -> int:
    """The rank that removes ``reduction`` of a dense ``[out, in]`` matrix's parameters (LoRD-style uniform rule)."""
    out, inp = shape
    return max(1, min(min(out, inp), math.floor((1.0 - reduction) * out * inp / (out + inp))))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRank(Format):
    """Rank-``rank`` factors, or (``reduction``) a parameter-reduction target a method turns into per-layer ranks."""

    family: ClassVar[str] = "lowrank"
    rank: int | None = None
    reduction: float | None = None
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.reduction is None):
            raise ConfigError(f"LowRank needs exactly one of rank= or reduction=, got rank={self.rank!r}, "
                              f"reduction={self.reduction!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ConfigError(f"LowRank.rank must be a positive integer, got {self.rank!r}")
        if self.reduction is not None and not (isinstance(self.reduction, (int, float)) and 0.0 < self.reduction < 1.0):
            raise ConfigError(f"LowRank.reduction must be a fraction in (0, 1) of parameters removed, got {self.reduction!r}")
        if self.dtype not in FACTOR_DTYPES:
            raise ConfigError(f"LowRank.dtype must be one of {sorted(FACTOR_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return FACTOR_DTYPES[self.dtype]

    def resolve(self, shape: Shape, rank: int | None = None) -> "LowRank":
        """A fixed-rank spec for ``shape``: ``rank`` if given, else this spec's rank or its uniform-reduction rank."""
        if rank is None:
            rank = self.rank if self.rank is not None else uniform_rank(shape, float(self.reduction))  # type: ignore[arg-type]
        return LowRank(rank=int(rank), dtype=self.dtype)

    def rank_for(self, shape: Shape) -> int:
        return self.rank if self.rank is not None else uniform_rank(shape, float(self.reduction))  # type: ignore[arg-type]

    def supports(self, shape: Shape) -> str | None:
        out, inp = shape
        if self.rank is not None and self.rank > min(out, inp):
            return f"rank {self.rank} exceeds min(out, in) = {min(out, inp)}; use a rank <= {min(out, inp)}"
        return None

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return self.rank_for(shape) * (out + inp) * self.torch_dtype.itemsize

    def spec(self) -> str:
        s = f"lowrank:r{self.rank}" if self.rank is not None else f"lowrank:{self.reduction:g}"
        return s if self.dtype == "float16" else f"{s}:{self.dtype}"


_SPEC = re.compile(r"^lowrank:(?:r(\d+)|(0?\.\d+))((?::(?:float16|bfloat16|float32))?)$")


def parse_lowrank(spec: str) -> LowRank:
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise FormatError(f"cannot parse low-rank format {spec!r}; expected lowrank:r<rank> (e.g. lowrank:r64) or "
                          "lowrank:<fraction of parameters removed> (e.g. lowrank:0.3), optionally :float32|:bfloat16")
    dtype = m.group(3)[1:] if m.group(3) else "float16"
    if m.group(1) is not None:
        return LowRank(rank=int(m.group(1)), dtype=dtype)
    return LowRank(reduction=float(m.group(2)), dtype=dtype)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LowRankWeight(CompressedWeight):
    format: LowRank
    u: torch.Tensor  # [out, r]
    v: torch.Tensor  # [r, in]

    @classmethod
    def from_factors(cls, fmt: LowRank, u: torch.Tensor, v: torch.Tensor) -> "LowRankWeight":
        """Store float factors ``u [out, r]``, ``v [r, in]`` in the spec's dtype (the rank is taken from ``u``)."""
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise FormatError(f"low-rank factors must be [out, r] and [r, in], got {tuple(u.shape)} and {tuple(v.shape)}")
        fixed = fmt.resolve((u.shape[0], v.shape[1]), rank=u.shape[1])
        dt = fixed.torch_dtype
        w = cls(format=fixed, shape=(u.shape[0], v.shape[1]), u=u.to(dt).contiguous(), v=v.to(dt).contiguous())
        w.validate()
        return w

    def validate(self) -> None:
        if self.format.rank is None:
            raise ConfigError(f"a stored low-rank weight needs a fixed rank, got spec {self.format.spec()}")
        r = self.format.rank
        if tuple(self.u.shape) != (self.shape[0], r) or tuple(self.v.shape) != (r, self.shape[1]):
            raise ConfigError(f"LowRankWeight {self.shape} rank {r}: factors have shapes {tuple(self.u.shape)}, "
                              f"{tuple(self.v.shape)}")
        super().validate()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.u.float() @ self.v.float()).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.nn.functional.linear(x, self.v.to(x.dtype))
        return torch.nn.functional.linear(h, self.u.to(x.dtype), None if bias is None else bias.to(x.dtype))


register_weight_class(LowRank, LowRankWeight)


def _register() -> None:
    from .registry import register_format

    register_format("lowrank", LowRank, parse_lowrank)


_register()
