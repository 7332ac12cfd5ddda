"""``Kronecker``: a matrix stored as a sum of Kronecker products, ``W ~ sum_t B_t (x) C_t``.

Van Loan & Pitsianis, "Approximation with Kronecker products" (1993); used for LLM adapters by SoKA (arXiv 2506.15251).
For ``W [m1*m2, n1*n2]``: ``W[i*m2 + k, j*n2 + l] = sum_t B[t, i, j] * C[t, k, l]`` with ``B [terms, m1, n1]`` and
``C [terms, m2, n2]``. The multiply never forms the Kronecker product (row-major reshape trick):
``X = x.reshape(n1, n2)``, ``(B (x) C) x = (B X C^T).reshape(m1*m2)``, summed over terms.

Stored: ``b`` and ``c`` in ``dtype`` (float16 by default), ``terms * (m1*n1 + m2*n2)`` entries.
Spec: ``kron:t4`` (factor shapes chosen per layer: ``m1`` the divisor of ``out`` closest to ``sqrt(out)``, ``n1``
likewise for ``in``, which balances the two factors) or ``kron:t4:24x24`` (``m1 x n1`` fixed), optionally
``:float32``/``:bfloat16``. Limits: ``m1 | out`` and ``n1 | in``; ``terms <= min(m1*n1, m2*n2)``. A generic dense
matrix is far from any short Kronecker sum; the format suits structured (or already-Kronecker) weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .lowrank import FACTOR_DTYPES


def balanced_divisor(n: int) -> int:
    """The divisor of ``n`` closest to ``sqrt(n)`` (the smaller one on ties)."""
    root = math.sqrt(n)
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: (abs(d - root), d))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kronecker(Format):
    family: ClassVar[str] = "kronecker"
    terms: int
    m1: int | None = None
    n1: int | None = None
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.terms, int) or self.terms < 1:
            raise ConfigError(f"Kronecker.terms must be a positive integer, got {self.terms!r}")
        if (self.m1 is None) != (self.n1 is None):
            raise ConfigError(f"Kronecker: give both m1 and n1 or neither, got m1={self.m1!r}, n1={self.n1!r}")
        for name in ("m1", "n1"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"Kronecker.{name} must be a positive integer, got {v!r}")
        if self.dtype not in FACTOR_DTYPES:
            raise ConfigError(f"Kronecker.dtype must be one of {sorted(FACTOR_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return FACTOR_DTYPES[self.dtype]

    def factor_shapes(self, shape: Shape) -> tuple[int, int, int, int]:
        """``(m1, n1, m2, n2)`` for a ``[out, in]`` matrix."""
        out, inp = shape
        m1 = self.m1 if self.m1 is not None else balanced_divisor(out)
        n1 = self.n1 if self.n1 is not None else balanced_divisor(inp)
        return m1, n1, out // m1, inp // n1

    def supports(self, shape: Shape) -> str | None:
        out, inp = shape
        if self.m1 is not None and (out % self.m1 or inp % self.n1):  # type: ignore[operator]
            return f"m1={self.m1} must divide out={out} and n1={self.n1} must divide in={inp}; use kron:t{self.terms}"
        m1, n1, m2, n2 = self.factor_shapes(shape)
        if self.terms > min(m1 * n1, m2 * n2):
            return f"{self.terms} terms exceed min(m1*n1, m2*n2) = {min(m1 * n1, m2 * n2)}; use fewer terms"
        return None

    def nbytes(self, shape: Shape) -> int:
        m1, n1, m2, n2 = self.factor_shapes(shape)
        return self.terms * (m1 * n1 + m2 * n2) * self.torch_dtype.itemsize

    def spec(self) -> str:
        s = f"kron:t{self.terms}" + (f":{self.m1}x{self.n1}" if self.m1 is not None else "")
        return s if self.dtype == "float16" else f"{s}:{self.dtype}"


_SPEC = re.compile(r"^kron:t(\d+)(?::(\d+)x(\d+))?((?::(?:float16|bfloat16|float32))?)$")


def parse_kronecker(spec: str) -> Kronecker:
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise FormatError(f"cannot parse Kronecker format {spec!r}; expected kron:t<terms>[:<m1>x<n1>], e.g. kron:t8")
    m1 = int(m.group(2)) if m.group(2) else None
    n1 = int(m.group(3)) if m.group(3) else None
    return Kronecker(terms=int(m.group(1)), m1=m1, n1=n1, dtype=m.group(4)[1:] if m.group(4) else "float16")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class KroneckerWeight(CompressedWeight):
    format: Kronecker
    b: torch.Tensor  # [terms, m1, n1]
    c: torch.Tensor  # [terms, m2, n2]

    @classmethod
    def from_factors(cls, fmt: Kronecker, shape: Shape, b: torch.Tensor, c: torch.Tensor) -> "KroneckerWeight":
        dt = fmt.torch_dtype
        w = cls(format=fmt, shape=tuple(shape), b=b.to(dt).contiguous(), c=c.to(dt).contiguous())  # type: ignore[arg-type]
        w.validate()
        return w

    def validate(self) -> None:
        m1, n1, m2, n2 = self.format.factor_shapes(self.shape)
        t = self.format.terms
        if tuple(self.b.shape) != (t, m1, n1) or tuple(self.c.shape) != (t, m2, n2):
            raise ConfigError(f"KroneckerWeight {self.shape} {self.format.spec()}: factors {tuple(self.b.shape)}, "
                              f"{tuple(self.c.shape)}; expected {(t, m1, n1)} and {(t, m2, n2)}")
        super().validate()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b, c = self.b.float(), self.c.float()
        t, m1, n1 = b.shape
        _, m2, n2 = c.shape
        w = torch.einsum("tij,tkl->ikjl", b, c).reshape(m1 * m2, n1 * n2)
        return w.to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, c = self.b.to(x.dtype), self.c.to(x.dtype)
        t, m1, n1 = b.shape
        _, m2, n2 = c.shape
        lead = x.shape[:-1]
        xs = x.reshape(-1, n1, n2)
        z = torch.einsum("bjl,tkl->tbjk", xs, c)  # X C_t^T for every term
        y = torch.einsum("tij,tbjk->bik", b, z).reshape(*lead, m1 * m2)
        return y if bias is None else y + bias.to(x.dtype)


register_weight_class(Kronecker, KroneckerWeight)


def _register() -> None:
    from .registry import register_format

    register_format("kron", Kronecker, parse_kronecker)


_register()
