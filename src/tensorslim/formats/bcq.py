"""Binary-coding quantization (BCQ): the weight format LUT-GEMM runs (Park et al., arXiv 2206.09557).

Equation: each group of ``g`` inputs of a row is ``w ~ sum_{i<q} alpha_i b_i + offset`` with ``b_i`` in {-1, +1}^g
and per-group reals ``alpha_i`` and ``offset``. A product needs only sign flips and additions per bit plane (LUT-GEMM
tabulates the +-sums of 8 activations) plus ``offset * sum(x_group)``.

Fit (:func:`fit_bcq`, as naver-aics/lut-gemm's ``bcq.py`` but with the offset solved jointly): greedy init
(``offset = mean w``; ``b_i = sign(r)``, ``alpha_i = mean|r|``, ``r -= alpha_i b_i``), then ``rounds`` alternations of
(a) least squares for ``(alpha, offset)`` given the planes and (b) each element's nearest of the ``2^q`` values
``sum_i +-alpha_i + offset``. Both steps are exact minimizations, so the squared error never increases. The final
planes are chosen against the *stored* (rounded) alphas.

Exact conversion from an asymmetric ``IntGroup`` (:func:`bcq_from_intgroup`): with ``w = s (c - z)`` and
``c = sum_i 2^i bit_i``, ``b_i = 2 bit_i - 1``, ``alpha_i = s 2^(i-1)``, ``offset = s ((2^q - 1)/2 - z)``. With fp16
integer scales and float32 alphas/offsets every term and partial sum is exact, so the decode is bit-identical.

Stored: ``planes`` uint8 ``[q * out, ceil(in/8)]`` (plane ``i`` is rows ``i*out .. (i+1)*out - 1``; bit 1 means +1),
``alphas`` ``[out, n_groups, q]`` and ``offsets`` ``[out, n_groups]`` in ``scale_dtype`` (fp16 default).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError
from .base import CompressedWeight, Format, Shape, register_weight_class
from .grouped import Grouped, check_group_size
from .intgroup import IntGroupWeight
from .packing import pack_codes, packed_row_bytes, unpack_codes

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BCQ(Grouped, Format):
    family: ClassVar[str] = "bcq"
    bits: int
    group_size: int | None = 128
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"BCQ.bits must be an integer in 1..8, got {self.bits!r}")
        check_group_size("BCQ", self.group_size)
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"BCQ.scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")



    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        ng = inp // self.group(inp)
        item = _SCALE_DTYPES[self.scale_dtype].itemsize
        return self.bits * out * packed_row_bytes(inp, 1) + out * ng * (self.bits + 1) * item

    def spec(self) -> str:
        s = f"bcq{self.bits}:" + ("pc" if self.group_size is None else f"g{self.group_size}")
        return s + ("" if self.scale_dtype == "float16" else f":{self.scale_dtype}")


_SPEC = re.compile(r"^bcq([1-8])(?::(g\d+|pc))?(?::(float16|bfloat16|float32))?$")


def parse_bcq(spec: str) -> BCQ:
    m = _SPEC.match(spec)
    if not m:
        raise FormatError(f"cannot parse BCQ format {spec!r}; expected bcq<bits 1-8>[:g<size>|:pc][:float32], e.g. bcq3:g64")
    g = m.group(2) or "g128"
    return BCQ(bits=int(m.group(1)), group_size=None if g == "pc" else int(g[1:]), scale_dtype=m.group(3) or "float16")


def pack_planes(signs: torch.Tensor) -> torch.Tensor:
    """``[q, out, in]`` bits (1 = +1) -> uint8 ``[q * out, ceil(in/8)]``."""
    q, out, inp = signs.shape
    return pack_codes(signs.reshape(q * out, inp).long(), 1)


def unpack_planes(planes: torch.Tensor, q: int, shape: Shape) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: ``[q, out, in]`` int64 bits."""
    out, inp = shape
    return unpack_codes(planes, 1, inp).reshape(q, out, inp)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BCQWeight(CompressedWeight):
    format: BCQ
    planes: torch.Tensor  # uint8 [q*out, in/8]
    alphas: torch.Tensor  # [out, n_groups, q]
    offsets: torch.Tensor  # [out, n_groups]

    def signs(self) -> torch.Tensor:
        """The +-1 planes ``[q, out, in]`` (float32)."""
        return unpack_planes(self.planes, self.format.bits, self.shape).float() * 2 - 1

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        g = self.format.group(inp)
        b = self.signs().reshape(self.format.bits, out, inp // g, g)
        a = self.alphas.float().permute(2, 0, 1).unsqueeze(-1)  # [q, out, ng, 1]
        w = self.offsets.float().unsqueeze(-1).expand(out, inp // g, g)
        for i in range(self.format.bits):  # fixed summation order (exactness of the int conversion relies on it)
            w = w + a[i] * b[i]
        return w.reshape(out, inp).to(dtype)


register_weight_class(BCQ, BCQWeight)


def _nearest_planes(w: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """For groups ``w [R, g]``, the +-1 planes ``[R, g, q]`` whose value ``B alpha + offset`` is nearest to ``w``."""
    q = alpha.shape[-1]
    combos = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=q)), device=w.device)  # [2^q, q]
    values = alpha @ combos.T + offset.unsqueeze(-1)  # [R, 2^q]
    best = torch.empty(w.shape, dtype=torch.long, device=w.device)
    step = max(1, (1 << 22) // (w.shape[1] * combos.shape[0]))
    for r in range(0, w.shape[0], step):  # chunked: [rows, g, 2^q] distances
        d = (w[r:r + step].unsqueeze(-1) - values[r:r + step].unsqueeze(1)).abs()
        best[r:r + step] = d.argmin(-1)
    return combos[best]


def _solve_scales(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``min ||w - B alpha - offset||`` per group (float64, rank-deficient safe)."""
    design = torch.cat([b, torch.ones_like(b[..., :1])], -1).double().cpu()  # [R, g, q+1]
    # on the CPU: CUDA's lstsq has only "gels", which assumes full rank (a group whose planes repeat is not)
    sol = torch.linalg.lstsq(design, w.double().cpu().unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    sol = sol.to(w.device)
    return sol[:, :-1].float(), sol[:, -1].float()


def fit_bcq(w: torch.Tensor, bits: int, rounds: int = 15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Alternating least squares for groups ``w [R, g]``: planes ``[R, g, q]`` (+-1), alphas ``[R, q]``, offsets
    ``[R]`` and the squared error after every half-step (non-increasing)."""
    w = w.float()
    offset = w.mean(-1)
    r = w - offset.unsqueeze(-1)
    planes, alphas = [], []
    for _ in range(bits):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(-1)
        r = r - a.unsqueeze(-1) * b
        planes.append(b)
        alphas.append(a)
    b = torch.stack(planes, -1)
    alpha = torch.stack(alphas, -1)
    history = [float((r**2).sum())]

    def err() -> float:
        return float(((w - (b * alpha.unsqueeze(1)).sum(-1) - offset.unsqueeze(-1)) ** 2).sum())

    for _ in range(rounds):
        alpha, offset = _solve_scales(w, b)
        history.append(err())
        b = _nearest_planes(w, alpha, offset)
        history.append(err())
    return b, alpha, offset, history


def quantize_bcq(w: torch.Tensor, fmt: BCQ, rounds: int = 15) -> BCQWeight:
    out, inp = w.shape
    g = fmt.group(inp)
    groups = w.float().reshape(out * (inp // g), g)
    b, alpha, offset = fit_bcq(groups, fmt.bits, rounds)[:3]
    dt = _SCALE_DTYPES[fmt.scale_dtype]
    alpha_s, offset_s = alpha.to(dt), offset.to(dt)
    b = _nearest_planes(groups, alpha_s.float(), offset_s.float())  # best planes for the stored scales
    bits = (b > 0).long().reshape(out, inp, fmt.bits).permute(2, 0, 1)
    ng = inp // g
    cw = BCQWeight(format=fmt, shape=(out, inp), planes=pack_planes(bits),
                   alphas=alpha_s.reshape(out, ng, fmt.bits).contiguous(), offsets=offset_s.reshape(out, ng).contiguous())
    cw.validate()
    return cw


def int_bitplanes(iw: IntGroupWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bits ``[q, out, in]`` of the integer codes, and float32 scale / zero ``[out, n_groups]``; refuses act-order."""
    if iw.perm is not None:
        raise ConfigError(f"{iw.format.spec()}: act-order codes are permuted; convert a weight without ':act'")
    codes, scale, zero = iw.unpacked()
    shifts = torch.arange(iw.format.bits, device=codes.device).view(-1, 1, 1)
    return (codes.unsqueeze(0) >> shifts) & 1, scale, zero


def bcq_from_intgroup(iw: IntGroupWeight) -> BCQWeight:
    """Exact BCQ form of an integer weight (float32 alphas/offsets): ``decode`` is bit-identical to ``iw.decode``."""
    fmt = iw.format
    bits, s, z = int_bitplanes(iw)
    q = fmt.bits
    alphas = s.unsqueeze(-1) * (2.0 ** (torch.arange(q, device=s.device, dtype=torch.float32) - 1))
    offsets = s * (((1 << q) - 1) / 2 - z)
    out = BCQ(bits=q, group_size=fmt.group_size, scale_dtype="float32")
    cw = BCQWeight(format=out, shape=iw.shape, planes=pack_planes(bits), alphas=alphas.contiguous(),
                   offsets=offsets.contiguous())
    cw.validate()
    return cw


from .registry import register_format  # noqa: E402 - registration after the definitions

register_format("bcq", BCQ, parse_bcq)
