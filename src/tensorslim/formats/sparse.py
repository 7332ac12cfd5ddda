"""Sparse weights: unstructured and N:M masks (``Sparse``) and GQSA-style group sparsity (``GroupSparse``).

``Sparse``: a bitmask ``[out, ceil(in/8)]`` (1 bit per weight, bit ``j`` of a row = input ``j`` is kept) plus the kept
values in row-major mask order.
- unstructured (``sparse:0.5``): exactly ``nnz = out*in - floor(s*out*in)`` kept values, stored flat ``[nnz]`` in
  ``value_dtype`` (fp16 default). Rows may keep different counts.
- N:M (``sparse:2:4``, ``sparse:4:8``): every run of ``m`` consecutive inputs of a row keeps exactly ``n`` (the
  pattern of Nvidia sparse tensor cores, groups along the reduction dimension). The kept values form a regular
  ``[out, in*n/m]`` *compact* matrix, stored dense or in an ``inner`` format (``sparse:2:4+int4:g64``). An inner
  ``IntGroup`` group size counts *original* columns: ``g64`` scales the 32 kept values of every 64 inputs, so the
  scales cost what they cost in dense ``int4:g64``; the compact matrix uses group ``g*n/m``.
``GroupSparse`` (GQSA, Zeng et al. 2024, arXiv 2412.17560): each row is cut into groups of ``g`` consecutive inputs;
whole groups are dropped, ``K = total - floor(s*total)`` groups kept per matrix (rows may keep different counts, so
``floor`` is exact to one group). Storage is block-sparse-row (BSR): group column indices ``[K]`` (uint8, int16 when a
row has over 256 groups), row pointers ``[out+1]`` int32, and the kept groups as a ``[K, g]`` matrix, dense or in an
inner format (``groupsparse:0.5+int4:g64``: the group size of the sparsity is the inner group size).

``nbytes`` counts mask / indices / row pointers and the values (with their scales). ``linear`` is the reference
(decode, then a dense matmul); a sparse kernel may come later. GQSA's trained stages (BQPO, E2E-OQP) are not part of
this format; the methods choose masks by magnitude, Wanda or OBS saliency.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .intgroup import IntGroup, quantize_rtn
from .packing import pack_codes, packed_row_bytes, unpack_codes

__all__ = ["GroupSparse", "GroupSparseWeight", "Sparse", "SparseWeight", "encode_group_sparse", "encode_sparse",
           "prune_count"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def prune_count(total: int, sparsity: float) -> int:
    """Entries (or groups) removed out of ``total`` at ``sparsity``: ``floor(s * total)``, robust to float noise."""
    return int(math.floor(sparsity * total + 1e-9))


def _check_sparsity(cls: str, s: object) -> None:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise ConfigError(f"{cls}.sparsity must be a number in [0, 1), got {s!r}")


def _check_dtype(cls: str, d: str) -> None:
    if d not in _DTYPES:
        raise ConfigError(f"{cls}.value_dtype must be one of {sorted(_DTYPES)}, got {d!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sparse(Format):
    """Unstructured (``sparsity``) or N:M (``n``, ``m``) sparsity; kept values dense or in ``inner`` (N:M only)."""

    family: ClassVar[str] = "sparse"
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    inner: Format | None = None
    value_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_dtype("Sparse", self.value_dtype)
        if self.sparsity is not None:
            if self.n is not None or self.m is not None:
                raise ConfigError("Sparse: give either sparsity (unstructured) or n and m (N:M), not both")
            _check_sparsity("Sparse", self.sparsity)
            if self.inner is not None:
                raise ConfigError(
                    "Sparse: an inner format needs a regular layout of kept values; use N:M (sparse:2:4+int4:g64) or "
                    "group sparsity (groupsparse:0.5+int4:g64) for sparse + quantized storage"
                )
        else:
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
            if not ok or not 0 < self.n < self.m or self.m > 256:  # type: ignore[operator]
                raise ConfigError(f"Sparse N:M needs integers 0 < n < m <= 256, got n={self.n!r}, m={self.m!r}")
        if self.inner is not None and not isinstance(self.inner, Format):
            raise ConfigError(f"Sparse.inner must be a Format or None, got {self.inner!r}")
        if isinstance(self.inner, IntGroup) and self.inner.act_order:
            raise ConfigError("Sparse: an act-order inner format is not supported; drop ':act'")

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.is_nm else float(self.sparsity)  # type: ignore[operator]

    def nnz(self, shape: Shape) -> int:
        out, inp = shape
        if self.is_nm:
            return out * (inp // self.m * self.n)  # type: ignore[operator]
        return out * inp - prune_count(out * inp, float(self.sparsity))  # type: ignore[arg-type]

    def compact_shape(self, shape: Shape) -> Shape:
        assert self.is_nm
        return shape[0], shape[1] // self.m * self.n  # type: ignore[operator]

    def compact_format(self) -> Format | None:
        """The inner format as applied to the compact ``[out, in*n/m]`` matrix (group sizes scaled by n/m)."""
        inner = self.inner
        if isinstance(inner, IntGroup) and inner.group_size is not None:
            return dataclasses.replace(inner, group_size=inner.group_size * self.n // self.m)  # type: ignore[operator]
        return inner

    def supports(self, shape: Shape) -> str | None:
        out, inp = shape
        if self.is_nm:
            if inp % self.m:  # type: ignore[operator]
                return f"{inp} inputs are not divisible by m={self.m}; use an m that divides {inp}, or ignore the layer"
            if isinstance(self.inner, IntGroup) and self.inner.group_size is not None:
                g = self.inner.group_size
                if (g * self.n) % self.m or g % self.m:  # type: ignore[operator]
                    return f"inner group {g} must be a multiple of m={self.m}"
                if inp % g:
                    return f"{inp} is not divisible by inner group {g}; use a group that divides {inp}"
            cf = self.compact_format()
            return None if cf is None else cf.supports(self.compact_shape(shape))
        return None

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        mask = out * packed_row_bytes(inp, 1)
        cf = self.compact_format() if self.is_nm else None
        if cf is not None:
            return mask + cf.nbytes(self.compact_shape(shape))
        return mask + self.nnz(shape) * _DTYPES[self.value_dtype].itemsize

    def spec(self) -> str:
        s = f"sparse:{self.n}:{self.m}" if self.is_nm else f"sparse:{_num(self.sparsity)}"
        if self.value_dtype != "float16":
            s += f":{self.value_dtype}"
        return s + (f"+{self.inner.spec()}" if self.inner is not None else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupSparse(Format):
    """GQSA-style group sparsity: whole groups of ``group_size`` inputs dropped, kept groups dense or in ``inner``."""

    family: ClassVar[str] = "groupsparse"
    sparsity: float
    group_size: int = 64
    inner: Format | None = None
    value_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_sparsity("GroupSparse", self.sparsity)
        _check_dtype("GroupSparse", self.value_dtype)
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"GroupSparse.group_size must be a positive integer, got {self.group_size!r}")
        if isinstance(self.inner, IntGroup):
            if self.inner.act_order:
                raise ConfigError("GroupSparse: an act-order inner format is not supported; drop ':act'")
            if self.inner.group_size is not None and self.group_size % self.inner.group_size:
                raise ConfigError(f"GroupSparse: inner group {self.inner.group_size} must divide group {self.group_size}")

    def n_groups(self, shape: Shape) -> int:
        return shape[0] * (shape[1] // self.group_size)

    def kept_groups(self, shape: Shape) -> int:
        total = self.n_groups(shape)
        return total - prune_count(total, self.sparsity)

    def index_dtype(self, inp: int) -> torch.dtype:
        return torch.uint8 if inp // self.group_size <= 256 else torch.int16

    def supports(self, shape: Shape) -> str | None:
        if shape[1] % self.group_size:
            return f"{shape[1]} inputs are not divisible by group {self.group_size}; use a group that divides it"
        if self.inner is not None:
            return self.inner.supports((self.kept_groups(shape), self.group_size))
        return None

    def nbytes(self, shape: Shape) -> int:
        k = self.kept_groups(shape)
        idx = k * self.index_dtype(shape[1]).itemsize + (shape[0] + 1) * 4
        if self.inner is not None:
            return idx + self.inner.nbytes((k, self.group_size))
        return idx + k * self.group_size * _DTYPES[self.value_dtype].itemsize

    def spec(self) -> str:
        s = f"groupsparse:{_num(self.sparsity)}"
        if self.inner is None or not isinstance(self.inner, IntGroup) or self.inner.group_size != self.group_size:
            s += f":g{self.group_size}"
        if self.value_dtype != "float16":
            s += f":{self.value_dtype}"
        return s + (f"+{self.inner.spec()}" if self.inner is not None else "")


def _num(x: float | None) -> str:
    return f"{float(x):g}"


# -- compressed weights ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SparseWeight(CompressedWeight):
    format: Sparse
    mask: torch.Tensor  # uint8 [out, ceil(in/8)], 1 = kept
    values: torch.Tensor | None = None  # value_dtype: [nnz] (unstructured) or [out, in*n/m] (N:M, no inner)
    inner: CompressedWeight | None = None  # the compact [out, in*n/m] matrix in the inner format

    def dense_mask(self) -> torch.Tensor:
        return unpack_codes(self.mask, 1, self.shape[1]).bool()

    def compact(self) -> torch.Tensor:
        """The kept values (float32): ``[nnz]`` unstructured, ``[out, in*n/m]`` N:M."""
        return self.inner.decode(torch.float32) if self.inner is not None else self.values.float()  # type: ignore[union-attr]

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mask = self.dense_mask()
        w = torch.zeros(self.shape, dtype=torch.float32, device=mask.device)
        w[mask] = self.compact().reshape(-1)
        return w.to(dtype)

    def sparsity(self) -> float:
        return 1.0 - int(self.dense_mask().sum()) / self.numel

    @classmethod
    def _part_format(cls, fmt: Format, shape: Shape, part: str) -> tuple[Format, Shape]:
        assert isinstance(fmt, Sparse) and part == "inner"
        return fmt.compact_format(), fmt.compact_shape(shape)  # type: ignore[return-value]

    def validate(self) -> None:
        super().validate()
        fmt, (out, inp) = self.format, self.shape
        mask = self.dense_mask()
        if fmt.is_nm:
            per = mask.reshape(out, inp // fmt.m, fmt.m).sum(-1)  # type: ignore[operator]
            if not bool((per == fmt.n).all()):
                raise ConfigError(f"SparseWeight {fmt.spec()}: the mask does not keep exactly {fmt.n} of every {fmt.m}")
        elif int(mask.sum()) != fmt.nnz(self.shape):
            raise ConfigError(f"SparseWeight {fmt.spec()}: mask keeps {int(mask.sum())}, the format needs {fmt.nnz(self.shape)}")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GroupSparseWeight(CompressedWeight):
    format: GroupSparse
    index: torch.Tensor  # uint8/int16 [K]: group column of each kept group, row by row
    rowptr: torch.Tensor  # int32 [out+1]
    values: torch.Tensor | None = None  # value_dtype [K, g]
    inner: CompressedWeight | None = None  # [K, g] in the inner format

    def group_mask(self) -> torch.Tensor:
        """``[out, in/g]`` bool: which groups are kept."""
        out, inp = self.shape
        rows = torch.repeat_interleave(torch.arange(out, device=self.index.device), self.rowptr.diff().long())
        m = torch.zeros(out, inp // self.format.group_size, dtype=torch.bool, device=self.index.device)
        m[rows, self.index.long()] = True
        return m

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        g = self.format.group_size
        blocks = self.inner.decode(torch.float32) if self.inner is not None else self.values.float()  # type: ignore[union-attr]
        w = torch.zeros(out, inp // g, g, dtype=torch.float32, device=blocks.device)
        w[self.group_mask()] = blocks
        return w.reshape(out, inp).to(dtype)

    @classmethod
    def _part_format(cls, fmt: Format, shape: Shape, part: str) -> tuple[Format, Shape]:
        assert isinstance(fmt, GroupSparse) and fmt.inner is not None and part == "inner"
        return fmt.inner, (fmt.kept_groups(shape), fmt.group_size)

    def validate(self) -> None:
        super().validate()
        k = self.format.kept_groups(self.shape)
        if self.index.shape != (k,) or self.rowptr.shape != (self.shape[0] + 1,) or int(self.rowptr[-1]) != k:
            raise ConfigError(f"GroupSparseWeight {self.format.spec()}: index/rowptr do not describe {k} kept groups")


register_weight_class(Sparse, SparseWeight)
register_weight_class(GroupSparse, GroupSparseWeight)


# -- encoding (shared by every pruning method) ---------------------------------------------------------------------
def _encode_inner(fmt: Format, compact: torch.Tensor) -> CompressedWeight:
    if isinstance(fmt, IntGroup):
        return quantize_rtn(compact, fmt)
    raise ConfigError(f"no round-to-nearest encoder for inner format {fmt.spec()}; pass the encoded inner weight")


def encode_sparse(fmt: Sparse, w: torch.Tensor, mask: torch.Tensor, *, inner: CompressedWeight | None = None) -> SparseWeight:
    """Store ``w`` under the boolean ``mask`` ``[out, in]``. With an inner format, the compact kept values are
    quantized by RTN unless ``inner`` (already encoded, e.g. by a joint solver) is given."""
    out, inp = w.shape
    mask = mask.bool()
    kept = w.float()[mask]
    if fmt.is_nm:
        kept = kept.reshape(fmt.compact_shape((out, inp)))
    values = None
    if fmt.inner is not None:
        if inner is None:
            inner = _encode_inner(fmt.compact_format(), kept)  # type: ignore[arg-type]
    else:
        values = kept.to(_DTYPES[fmt.value_dtype]).contiguous()
    sw = SparseWeight(format=fmt, shape=(out, inp), mask=pack_codes(mask.to(torch.int64), 1), values=values, inner=inner)
    sw.validate()
    return sw


def encode_group_sparse(fmt: GroupSparse, w: torch.Tensor, group_mask: torch.Tensor, *,
                        inner: CompressedWeight | None = None) -> GroupSparseWeight:
    """Store ``w`` keeping the groups where ``group_mask`` ``[out, in/g]`` is set (BSR layout)."""
    out, inp = w.shape
    g = fmt.group_size
    gm = group_mask.bool()
    blocks = w.float().reshape(out, inp // g, g)[gm]  # [K, g], row-major
    cols = torch.arange(inp // g, device=w.device).expand(out, -1)[gm]
    rowptr = torch.zeros(out + 1, dtype=torch.int32, device=w.device)
    rowptr[1:] = gm.sum(1).cumsum(0).to(torch.int32)
    values = None
    if fmt.inner is not None:
        if inner is None:
            inner = _encode_inner(fmt.inner, blocks)
    else:
        values = blocks.to(_DTYPES[fmt.value_dtype]).contiguous()
    gw = GroupSparseWeight(format=fmt, shape=(out, inp), index=cols.to(fmt.index_dtype(inp)).contiguous(),
                           rowptr=rowptr, values=values, inner=inner)
    gw.validate()
    return gw


# -- spec strings --------------------------------------------------------------------------------------------------
_SPARSE = re.compile(r"^sparse:(?:(\d+):(\d+)|(\d*\.?\d+))((?::(?:float16|bfloat16|float32))?)$")
_GROUP = re.compile(r"^groupsparse:(\d*\.?\d+)((?::g\d+)?)((?::(?:float16|bfloat16|float32))?)$")


def parse_sparse(spec: str) -> Sparse:
    from .registry import parse_format

    s = spec.strip().lower()
    head, _, rest = s.partition("+")
    mt = _SPARSE.match(head)
    if not mt:
        raise FormatError(f"cannot parse sparse format {spec!r}; expected sparse:<s in [0,1)>, sparse:<n>:<m>, "
                          "or sparse:<n>:<m>+<inner format>, e.g. sparse:0.5, sparse:2:4, sparse:2:4+int4:g64")
    inner = parse_format(rest) if rest else None
    dtype = mt.group(4)[1:] or "float16"
    if mt.group(3) is not None:
        return Sparse(sparsity=float(mt.group(3)), inner=inner, value_dtype=dtype)
    return Sparse(n=int(mt.group(1)), m=int(mt.group(2)), inner=inner, value_dtype=dtype)


def parse_group_sparse(spec: str) -> GroupSparse:
    from .registry import parse_format

    s = spec.strip().lower()
    head, _, rest = s.partition("+")
    mt = _GROUP.match(head)
    if not mt:
        raise FormatError(f"cannot parse group-sparse format {spec!r}; expected groupsparse:<s>[:g<size>][+<inner>], "
                          "e.g. groupsparse:0.5+int4:g64 or groupsparse:0.5:g64")
    inner = parse_format(rest) if rest else None
    if mt.group(2):
        g = int(mt.group(2)[2:])
    elif isinstance(inner, IntGroup) and inner.group_size is not None:
        g = inner.group_size
    else:
        g = 64
    return GroupSparse(sparsity=float(mt.group(1)), group_size=g, inner=inner, value_dtype=mt.group(3)[1:] or "float16")


def _register() -> None:
    from .registry import register_format

    register_format("sparse", Sparse, parse_sparse, owns_plus=True)
    register_format("groupsparse", GroupSparse, parse_group_sparse, owns_plus=True)


_register()
