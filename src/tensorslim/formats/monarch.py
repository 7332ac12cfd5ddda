"""``Monarch``: two block-diagonal factors around a fixed reshape-transpose permutation (Dao et al., ICML 2022).

Convention (fixed; the projection in :mod:`tensorslim.methods.structured` is optimal for exactly this one): with ``b``
blocks, ``in = b*p``, ``out = b*s`` and a per-slice rank ``r``,
``W[l*s + q, k*p + j] = sum_{t<r} L[l, q, k*r + t] * R[k, l*r + t, j]``,
so every ``s x p`` slice ``(l, k)`` of ``W`` is a rank-``r`` product. The multiply is the Monarch one: block-diagonal
``R`` (``b`` blocks ``[b*r, p]``), the permutation ``[k, l, t] -> [l, k, t]``, block-diagonal ``L`` (``b`` blocks
``[s, b*r]``): two batched GEMMs, ``b*r*(in + out)`` MACs per token. The square Monarch of the paper is ``b = sqrt(n)``,
``r = 1`` (``2 n^1.5`` parameters); ``b`` blocks of size ``n/b`` is ``r = n/b^2``.

Stored: ``l_blocks [b, s, b*r]``, ``r_blocks [b, b*r, p]`` in ``dtype`` (float16 default): ``b*r*(in+out)`` entries.
Spec: ``monarch:b24`` (``r = 1``) or ``monarch:b4:r36``, optionally ``:float32``/``:bfloat16``.
Limits: ``b`` must divide both ``in`` and ``out`` (no padding); ``r <= min(s, p)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .lowrank import FACTOR_DTYPES


@dataclasses.dataclass(frozen=True, kw_only=True)
class Monarch(Format):
    family: ClassVar[str] = "monarch"
    blocks: int
    rank: int = 1
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("blocks", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Monarch.{name} must be a positive integer, got {v!r}")
        if self.dtype not in FACTOR_DTYPES:
            raise ConfigError(f"Monarch.dtype must be one of {sorted(FACTOR_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return FACTOR_DTYPES[self.dtype]

    def supports(self, shape: Shape) -> str | None:
        out, inp = shape
        b = self.blocks
        if out % b or inp % b:
            divs = [d for d in range(2, 65) if out % d == 0 and inp % d == 0]
            return f"{b} blocks must divide out={out} and in={inp}; common divisors: {divs[-6:]}"
        if self.rank > min(out // b, inp // b):
            return f"slice rank {self.rank} exceeds the slice size {out // b}x{inp // b}; use a smaller rank"
        return None

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return self.blocks * self.rank * (out + inp) * self.torch_dtype.itemsize

    def spec(self) -> str:
        s = f"monarch:b{self.blocks}" + (f":r{self.rank}" if self.rank != 1 else "")
        return s if self.dtype == "float16" else f"{s}:{self.dtype}"


_SPEC = re.compile(r"^monarch:b(\d+)(?::r(\d+))?((?::(?:float16|bfloat16|float32))?)$")


def parse_monarch(spec: str) -> Monarch:
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise FormatError(f"cannot parse Monarch format {spec!r}; expected monarch:b<blocks>[:r<rank>], e.g. monarch:b24")
    return Monarch(blocks=int(m.group(1)), rank=int(m.group(2) or 1), dtype=m.group(3)[1:] if m.group(3) else "float16")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class MonarchWeight(CompressedWeight):
    format: Monarch
    l_blocks: torch.Tensor  # [b, s, b*r]
    r_blocks: torch.Tensor  # [b, b*r, p]

    @classmethod
    def from_factors(cls, fmt: Monarch, shape: Shape, l_blocks: torch.Tensor, r_blocks: torch.Tensor) -> "MonarchWeight":
        dt = fmt.torch_dtype
        w = cls(format=fmt, shape=tuple(shape), l_blocks=l_blocks.to(dt).contiguous(),  # type: ignore[arg-type]
                r_blocks=r_blocks.to(dt).contiguous())
        w.validate()
        return w

    def validate(self) -> None:
        b, r = self.format.blocks, self.format.rank
        s, p = self.shape[0] // b, self.shape[1] // b
        if tuple(self.l_blocks.shape) != (b, s, b * r) or tuple(self.r_blocks.shape) != (b, b * r, p):
            raise ConfigError(f"MonarchWeight {self.shape} {self.format.spec()}: blocks {tuple(self.l_blocks.shape)}, "
                              f"{tuple(self.r_blocks.shape)}; expected {(b, s, b * r)} and {(b, b * r, p)}")
        super().validate()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b, r = self.format.blocks, self.format.rank
        lb = self.l_blocks.float().reshape(b, -1, b, r)  # [l, q, k, t]
        rb = self.r_blocks.float().reshape(b, b, r, -1)  # [k, l, t, j]
        w = torch.einsum("lqkt,kltj->lqkj", lb, rb)
        return w.reshape(self.shape[0], self.shape[1]).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, r = self.format.blocks, self.format.rank
        lead = x.shape[:-1]
        xs = x.reshape(-1, b, self.shape[1] // b).transpose(0, 1)  # [k, n, p]
        h = torch.bmm(xs, self.r_blocks.to(x.dtype).transpose(1, 2))  # [k, n, b*r] indexed (l, t)
        h = h.reshape(b, -1, b, r).permute(2, 1, 0, 3).reshape(b, -1, b * r)  # [l, n, (k, t)]
        y = torch.bmm(h, self.l_blocks.to(x.dtype).transpose(1, 2))  # [l, n, s]
        y = y.transpose(0, 1).reshape(*lead, self.shape[0])
        return y if bias is None else y + bias.to(x.dtype)


register_weight_class(Monarch, MonarchWeight)


def _register() -> None:
    from .registry import register_format

    register_format("monarch", Monarch, parse_monarch)


_register()
