"""Kernel-side layouts of the float, binary-coded and 2:4-sparse formats (one-time views or repacks, never a change
to what is stored; :mod:`.dispatch_ext` memoizes them per weight object).

All follow the integer kernels' transposed word layout (:mod:`.layout`): int32 words ``[K*b/32, N]`` with lanes along
the outputs, so a ``[BK/P, BN]`` tile is one coalesced load.

- :class:`FloatKernelLayout` (``FP8Weight``, ``MXFPWeight``, ``NVFP4Weight``): the stored element rows (E2M1 two a
  byte, low nibble first, or one FP8 byte) viewed as int32 and transposed; scales transposed to ``[n_groups, N]``
  in their stored encoding (fp32, E8M0 uint8, E4M3 uint8) so the kernel reads 8 bits a block, not 32.
- :class:`BCQKernelLayout` (``BCQWeight``): each sign plane ``[out, in/8]`` bytes viewed as int32 (bit ``b`` of word
  ``j`` = input ``32j + b``) and transposed: ``planes [q, K/32, N]``; alphas ``[q, n_groups, N]``, offsets
  ``[n_groups, N]`` (stored dtype).
- :class:`FP4WALayout` (``MXFPWeight`` with E2M1 elements, ``NVFP4Weight``): int4's weights-as-A repack of the
  codes and the scale bytes ``[N, n_blocks]`` (E8M0 exponents, where blocks whose codes are all zero get a harmless
  exponent; or NVFP4's E4M3 scales, with ``1/g`` as ``post``) for :mod:`.triton.wa_fp4`.
- :class:`BCQWALayout` (``BCQWeight``): the sign planes in a 1-bit weights-as-A layout, ``2 alpha`` and ``offset -
  sum alpha`` in fp32 ``[.., N, n_groups]``, for :mod:`.triton.wa_bcq`.
- :class:`Sparse24KernelLayout` (``SparseWeight`` 2:4 with an inner int4 ``IntGroup``): the inner weight's integer
  layout (compact ``[K/2]`` codes: :func:`.layout.int_layout`) plus 2-bit position metadata: for every run of 4
  inputs a nibble ``i0 | i1 << 2`` (the two kept positions, ``i0 < i1``; the compact values are stored in that
  order), 8 nibbles a word, ``[K/32, N]`` int32 (the bits of the mask, in the form the kernel wants).
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats.base import CompressedWeight
from ..formats.packing import pack_codes
from .layout import IntKernelLayout, int_layout, int_layout_reason, wa_block_words, wa_pack4

ELEMS = {"e2m1": 0, "e4m3": 1, "e5m2": 2}
SCALE_FLOAT, SCALE_E8M0, SCALE_E4M3 = 0, 1, 2


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class FloatKernelLayout:
    n: int
    k: int
    elem: int  # ELEMS
    scale_mode: int  # SCALE_*
    group: int
    q: torch.Tensor  # int32 [K*b/32, N]
    scales: torch.Tensor  # [n_groups, N]: fp32, or uint8 codes
    global_scale: torch.Tensor | None  # fp32 [1] (NVFP4)

    @property
    def bits(self) -> int:
        return 4 if self.elem == 0 else 8

    def meta(self) -> list[int]:
        return [self.k, self.elem, self.scale_mode, self.group]

    def key(self) -> tuple:
        return ("float", self.n, self.k, self.elem, self.scale_mode, self.group)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BCQKernelLayout:
    n: int
    k: int
    q: int  # planes
    group: int
    planes: torch.Tensor  # int32 [q, K/32, N]
    alphas: torch.Tensor  # [q, n_groups, N]
    offsets: torch.Tensor  # [n_groups, N]

    def meta(self) -> list[int]:
        return [self.k, self.q, self.group]

    def key(self) -> tuple:
        return ("bcq", self.n, self.k, self.q, self.group)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Sparse24KernelLayout:
    n: int
    k: int  # original inputs
    inner: IntKernelLayout  # compact [N, K/2] int4 codes
    idx: torch.Tensor  # int32 [K/32, N]: nibble i0 | i1 << 2 per run of 4 inputs

    @property
    def group(self) -> int:
        """The scale group in *original* inputs (twice the compact group)."""
        return 2 * self.inner.group

    def meta(self) -> list[int]:
        return [self.k, self.group, int(self.inner.symmetric)]

    def key(self) -> tuple:
        return ("sp24", self.n, self.k, self.group, self.inner.symmetric)


def _types() -> dict[str, type]:
    from ..formats.bcq import BCQWeight
    from ..formats.fp8 import FP8Weight
    from ..formats.mx import MXFPWeight, NVFP4Weight
    from ..formats.sparse import SparseWeight

    return {"fp8": FP8Weight, "mx": MXFPWeight, "nvfp4": NVFP4Weight, "bcq": BCQWeight, "sparse": SparseWeight}


def ext_layout_reason(cw: CompressedWeight) -> str | None:
    """``None`` if one of the float/BCQ/2:4 kernels can run ``cw``, else why not."""
    t = _types()
    out, inp = cw.shape
    name = f"{type(cw).__name__} ({cw.format.spec()})"
    if isinstance(cw, (t["fp8"], t["mx"], t["nvfp4"])):
        fmt = cw.format
        g = fmt.group(inp) if isinstance(cw, t["fp8"]) else fmt.block_size
        if inp % 32:
            return f"{name}: in_features {inp} is not a multiple of 32"
        if g % 16:
            return f"{name}: block {g} is not a multiple of 16"
        return None
    if isinstance(cw, t["bcq"]):
        g = cw.format.group(inp)
        if inp % 32 or g % 32:
            return f"{name}: in_features {inp} and group {g} must be multiples of 32"
        return None
    if isinstance(cw, t["sparse"]):
        from ..formats.intgroup import IntGroupWeight

        fmt = cw.format
        if not (fmt.n == 2 and fmt.m == 4 and isinstance(cw.inner, IntGroupWeight) and cw.inner.format.bits == 4):
            return f"no kernel for {name}: only 2:4 with an inner int4 IntGroup has one"
        if inp % 32:
            return f"{name}: in_features {inp} is not a multiple of 32"
        reason = int_layout_reason(cw.inner)
        if reason is None and cw.inner.format.group(inp // 2) % 16:
            reason = "the compact group must be a multiple of 16"
        return None if reason is None else f"{name}: {reason}"
    return f"no kernel for {name}"


def _words_t(codes: torch.Tensor) -> torch.Tensor:
    """Stored ``[out, bytes]`` rows -> ``int32 [bytes/4, out]`` (little-endian words, transposed)."""
    return codes.contiguous().view(torch.uint8).view(torch.int32).t().contiguous()


def float_layout(cw: CompressedWeight) -> FloatKernelLayout:
    t = _types()
    out, inp = cw.shape
    if isinstance(cw, t["fp8"]):
        return FloatKernelLayout(n=out, k=inp, elem=ELEMS[cw.format.kind], scale_mode=SCALE_FLOAT,
                                 group=cw.format.group(inp), q=_words_t(cw.codes),
                                 scales=cw.scales.float().t().contiguous(), global_scale=None)
    if isinstance(cw, t["mx"]):
        return FloatKernelLayout(n=out, k=inp, elem=ELEMS[cw.format.element], scale_mode=SCALE_E8M0,
                                 group=cw.format.block_size, q=_words_t(cw.codes),
                                 scales=cw.scales.view(torch.uint8).t().contiguous(), global_scale=None)
    assert isinstance(cw, t["nvfp4"])
    return FloatKernelLayout(n=out, k=inp, elem=0, scale_mode=SCALE_E4M3, group=cw.format.block_size,
                             q=_words_t(cw.codes), scales=cw.scales.view(torch.uint8).t().contiguous(),
                             global_scale=cw.global_scale.float().reshape(1).contiguous())


def bcq_layout(cw: CompressedWeight) -> BCQKernelLayout:
    out, inp = cw.shape
    q = cw.format.bits
    planes = cw.planes.contiguous().reshape(q, out, inp // 8).view(torch.int32)  # [q, out, K/32]
    return BCQKernelLayout(n=out, k=inp, q=q, group=cw.format.group(inp),
                           planes=planes.permute(0, 2, 1).contiguous(),
                           alphas=cw.alphas.permute(2, 1, 0).contiguous(), offsets=cw.offsets.t().contiguous())


def sparse24_layout(cw: CompressedWeight) -> Sparse24KernelLayout:
    out, inp = cw.shape
    m = cw.dense_mask().reshape(out, inp // 4, 4)
    pos = torch.arange(4, device=m.device)
    i0 = torch.where(m, pos, 4).amin(-1)
    i1 = torch.where(m, pos, -1).amax(-1)
    nib = pack_codes((i0 | (i1 << 2)).long(), 4)  # [out, K/8] bytes, low nibble first
    return Sparse24KernelLayout(n=out, k=inp, inner=int_layout(cw.inner), idx=_words_t(nib))


def ext_layout(cw: CompressedWeight):
    t = _types()
    if isinstance(cw, t["bcq"]):
        return bcq_layout(cw)
    if isinstance(cw, t["sparse"]):
        return sparse24_layout(cw)
    return float_layout(cw)


# E8M0 exponents for which wa_fp4's tile (element x 2^(e - 127), built by one packed multiply) is exact and normal:
# bf16 needs the multiplier 2^(e - 1) to be a bf16 and 0.5 x 2^(e - 127) >= 2^-126; fp16 needs 2^(e - 113) to be a
# normal fp16 and the tile's values to lie on fp16's grid (>= 2^-24) and range.
MX_WA_EXP = {torch.bfloat16: (2, 128), torch.float16: (104, 128)}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class FP4WALayout:
    n: int
    k: int
    j: int  # words a row per block of 8 j inputs
    group: int  # the scale block: MX a multiple of j; NVFP4 16 (two blocks a code position of j = 32)
    q: torch.Tensor  # int32 [n, k/8]: wa_pack4 of the E2M1 codes
    sc: torch.Tensor  # uint8 [n, k/group]: E8M0 exponents (MX) or E4M3 scale bits (NVFP4)
    nv: bool = False  # NVFP4 (E4M3 block scales, per-tensor 1/g as ``post``)
    post: float = 1.0  # NVFP4: 1/g in fp32, applied to the fp32 accumulator
    exp_range: tuple[int, int] = (127, 127)  # MX: min and max exponent over the blocks with a nonzero code

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dtype_ok(self, dtype: torch.dtype) -> bool:
        if self.nv:  # exact for every E4M3 scale in both dtypes (see triton.wa_fp4.nv_tile)
            return dtype in (torch.bfloat16, torch.float16)
        lo, hi = MX_WA_EXP.get(dtype, (1, 0))
        return lo <= self.exp_range[0] and self.exp_range[1] <= hi

    def meta(self) -> list[int]:
        return [self.k, self.group, self.j, int(self.nv)]

    def key(self) -> tuple:
        return ("fp4wa", self.nv, self.n, self.k, self.group, self.j)


def fp4_wa_reason(cw: CompressedWeight) -> str | None:
    """``None`` if :func:`fp4_wa_layout` can repack ``cw`` (MXFP4 whose block fits the "wa" blocks, or NVFP4 with
    ``in_features`` a multiple of 256)."""
    from ..formats.mx import MXFPWeight, NVFP4Weight

    out, inp = cw.shape
    if isinstance(cw, NVFP4Weight):
        if cw.format.block_size != 16 or inp % 256:
            return f"nvfp4: in_features {inp} / block {cw.format.block_size} do not fit blocks of 256 inputs"
        return None
    if not (isinstance(cw, MXFPWeight) and cw.format.element == "e2m1"):
        return f"{type(cw).__name__}: the weights-as-A float kernel takes MXFP4 (E2M1) and NVFP4 only"
    g = cw.format.block_size
    j = wa_block_words(inp, g)
    if j is None or j < 32:
        return f"mxfp4: in_features {inp} / block {g} do not fit blocks of 256 or 512 inputs"
    return None


def fp4_wa_layout(cw: CompressedWeight) -> FP4WALayout:
    from ..formats.mx import NVFP4Weight
    from ..formats.packing import unpack_codes

    assert fp4_wa_reason(cw) is None, fp4_wa_reason(cw)
    out, inp = cw.shape
    g = cw.format.block_size
    codes = unpack_codes(cw.codes, 4, inp)  # [out, inp] E2M1 codes
    if isinstance(cw, NVFP4Weight):
        post = float((1.0 / cw.global_scale.float().cpu())[0])  # fp32 1/g, as decode's s_b / g divides
        return FP4WALayout(n=out, k=inp, j=32, group=g, q=wa_pack4(codes, 32),
                           sc=cw.scales.view(torch.uint8).contiguous(), nv=True, post=post)
    j = wa_block_words(inp, g)
    live = (codes & 7).reshape(out, inp // g, g).any(-1)  # blocks with a nonzero element
    e8 = torch.where(live, cw.scales.view(torch.uint8), torch.full_like(cw.scales.view(torch.uint8), 127))
    ev = e8[live].int()
    rng = (int(ev.min()), int(ev.max())) if ev.numel() else (127, 127)
    return FP4WALayout(n=out, k=inp, j=j, group=g, q=wa_pack4(codes, j), sc=e8.contiguous(), exp_range=rng)


BCQ_WA_JS = (32, 64)  # words a row per plane per block of 16 J inputs, preferred first: 32 measured on the H100
# (session 13); 64 (twice the MMA work between waits) serves groups of 1024: measured in session 14 on 4096x14336,
# 11% faster at 1 row, 25% slower at 16 and 2.4x slower at 64 rows


def bcq_wa_block_words(k: int, group: int) -> int | None:
    return next((j for j in BCQ_WA_JS if k % (16 * j) == 0 and group % j == 0 and (16 * j) % group == 0), None)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BCQWALayout:
    n: int
    k: int
    q: int  # planes
    j: int
    group: int
    planes: torch.Tensor  # int32 [q, n, k/32]: wa_pack1 of each sign plane
    a2: torch.Tensor  # fp32 [q, n, n_groups]: 2 alpha
    c: torch.Tensor  # fp32 [n, n_groups]: offset - sum alpha

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def meta(self) -> list[int]:
        return [self.k, self.q, self.group, self.j]

    def key(self) -> tuple:
        return ("bcqwa", self.n, self.k, self.q, self.group, self.j)


def wa_pack1(bits: torch.Tensor, j: int) -> torch.Tensor:
    """1-bit codes ``[n, k]`` -> the weights-as-A words ``int32 [n, k/32]``: block (``16 j`` inputs) input ``j t + 2p
    + e`` is bit ``t + 16 e`` of the block's word ``p``."""
    n, k = bits.shape
    blocks = bits.reshape(n, k // (16 * j), 16, j // 2, 2).permute(0, 1, 3, 4, 2)  # [n, B, p, e, t]
    return pack_codes(blocks.reshape(n, k), 1).view(torch.int32).reshape(n, k // 32)


def bcq_wa_reason(cw: CompressedWeight) -> str | None:
    """``None`` if :func:`bcq_wa_layout` can repack ``cw`` (a BCQ weight of 1-4 planes, ``in_features`` a multiple of
    512 and a group of 32-512 inputs that divides the block)."""
    from ..formats.bcq import BCQWeight

    if not isinstance(cw, BCQWeight):
        return f"{type(cw).__name__}: the weights-as-A BCQ kernel takes BCQ weights"
    out, inp = cw.shape
    g = cw.format.group(inp)
    if not 1 <= cw.format.bits <= 4:
        return f"bcq: {cw.format.bits} planes (the weights-as-A BCQ kernel takes 1 to 4)"
    if bcq_wa_block_words(inp, g) is None:
        return f"bcq: in_features {inp} / group {g} do not fit blocks of 512 or 1024 inputs in groups of 32-512"
    return None


def bcq_wa_layout(cw: CompressedWeight, j: int | None = None) -> BCQWALayout:
    """The 1-bit weights-as-A repack; ``j`` (32 or 64, where it fits) defaults to :func:`bcq_wa_block_words`."""
    from ..formats.bcq import unpack_planes

    assert bcq_wa_reason(cw) is None, bcq_wa_reason(cw)
    out, inp = cw.shape
    q = cw.format.bits
    bits = unpack_planes(cw.planes, q, cw.shape)  # [q, out, inp]
    g = cw.format.group(inp)
    j = j or bcq_wa_block_words(inp, g)
    assert j in BCQ_WA_JS and inp % (16 * j) == 0 and g % j == 0 and (16 * j) % g == 0, (inp, g, j)
    planes = torch.stack([wa_pack1(bits[i], j) for i in range(q)]).contiguous()
    alphas = cw.alphas.float()  # [out, ng, q]
    c = cw.offsets.float()
    for i in range(q):  # decode()'s order
        c = c - alphas[..., i]
    return BCQWALayout(n=out, k=inp, q=q, j=j, group=cw.format.group(inp), planes=planes,
                       a2=(2 * alphas).permute(2, 0, 1).contiguous(), c=c.contiguous())
