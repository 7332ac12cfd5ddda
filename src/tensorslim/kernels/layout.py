"""Kernel-side layout of stored formats: what the Triton kernels read, derived once from a compressed weight.

The stored ``IntGroup`` layout (:mod:`tensorslim.formats.packing`) is a little-endian bit stream per output row.
The kernels want the *transposed* word layout used by the GPTQ-Triton / split-K kernels: ``q[K*b/32, N]`` int32
where word ``(j, n)`` holds codes ``j*P .. j*P+P-1`` (``P = 32 / b``) of output ``n``, code ``j*P+t`` at bits
``t*b``. Then a ``[BK, BN]`` weight tile is read with lanes along ``N`` (coalesced), every word once per code it holds
(L1 broadcast), and needs no reshape or transpose before ``tl.dot``. Widths that are not powers of two are split into
two power-of-two *planes* (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2 bits): ``code = plane_a | plane_b << bits_a``; together
they hold exactly ``bits`` bits per weight. Scales are transposed to ``[n_groups, N]`` (stored dtype) and zero points
unpacked to uint8 ``[n_groups, N]`` (8 bits a group instead of ``bits``: 0.03 bits/weight more at group 128).

This is a one-time repack into a kernel-side copy kept by :mod:`.dispatch` per weight object, never a change to the
stored format; it costs as much GPU memory as the codes (the stored tensors stay where they are). Act-order weights
keep their permutation: the kernel multiplies ``x[:, perm]`` by the stored (permuted) columns.

Ternary weights (codes ``t + 1`` at 2 bits, per-group fp16 or per-tensor fp32 scale) are the 2-bit integer layout
with zero point 1 (per-tensor: one "group" of all inputs, the scale repeated per column), so they run on the same
kernels (:func:`ternary_layout`).

Limits: ``in`` must be a multiple of 32; the group a multiple of 32 (or per-channel); 7-bit codes would need three
planes and take the reference path.
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats.intgroup import IntGroupWeight
from ..formats.packing import pack_codes, unpack_codes

# bits -> (bits of plane a, bits of plane b); plane b is absent when 0.
PLANES: dict[int, tuple[int, int]] = {1: (1, 0), 2: (2, 0), 3: (2, 1), 4: (4, 0), 5: (4, 1), 6: (4, 2), 8: (8, 0)}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class IntKernelLayout:
    """What the integer kernels read for one ``IntGroupWeight`` (tensors are views or one-time repacks). ``qa``,
    ``qb``, ``scales`` and ``zeros`` are all ``None`` in the dispatcher's runtime layout of a weight that runs on
    "wa" (:func:`tensorslim.kernels.dispatch.runtime_layout`: only the weights-as-A repack is kept)."""

    n: int  # out features
    k: int  # in features
    bits: int
    bits_a: int
    bits_b: int
    group: int
    symmetric: bool
    qa: torch.Tensor | None  # int32 [k * bits_a / 32, n]
    qb: torch.Tensor | None  # int32 [k * bits_b / 32, n] or None
    scales: torch.Tensor | None  # [n_groups, n], stored dtype
    zeros: torch.Tensor | None  # uint8 [n_groups, n], or None when symmetric
    perm: torch.Tensor | None  # int64 [k] or None

    @property
    def n_groups(self) -> int:
        return self.k // self.group


def int_layout_reason(w: IntGroupWeight) -> str | None:
    """``None`` if the integer kernels can run ``w``, else why not (the dispatcher then takes the reference path)."""
    out, inp = w.shape
    fmt = w.format
    if fmt.bits not in PLANES:
        return f"{fmt.bits}-bit codes have no kernel layout (supported: {sorted(PLANES)})"
    if inp % 32:
        return f"in_features {inp} is not a multiple of 32"
    g = fmt.group(inp)
    if g % 32 and g != inp:
        return f"group {g} is not a multiple of 32"
    return None


def ternary_layout_reason(w) -> str | None:
    out, inp = w.shape
    g = w.format.group_size or inp
    if inp % 32:
        return f"in_features {inp} is not a multiple of 32"
    if g % 32 and g != inp:
        return f"group {g} is not a multiple of 32"
    return None


def ternary_layout(w) -> IntKernelLayout:
    """Kernel view of a ``TernaryWeight``: int2 codes ``t + 1`` with zero point 1."""
    out, inp = w.shape
    g = w.format.group_size or inp
    ng = inp // g
    scales = w.scales.reshape(1, 1).expand(1, out) if w.format.group_size is None else w.scales.t()
    return IntKernelLayout(
        n=out, k=inp, bits=2, bits_a=2, bits_b=0, group=g, symmetric=False,
        qa=w.codes.contiguous().view(torch.int32).t().contiguous(), qb=None, scales=scales.contiguous(),
        zeros=torch.ones(ng, out, dtype=torch.uint8, device=w.codes.device), perm=None,
    )


def _plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_codes(codes, bits).view(torch.int32).t().contiguous()


def int_layout(w: IntGroupWeight) -> IntKernelLayout:
    """Build the kernel view of ``w`` (a zero-copy view for 1/2/4/8 bits, a one-time plane split otherwise)."""
    reason = int_layout_reason(w)
    if reason is not None:
        raise ValueError(reason)  # internal: callers check int_layout_reason first
    out, inp = w.shape
    fmt = w.format
    bits_a, bits_b = PLANES[fmt.bits]
    if bits_b == 0:
        qa = w.codes.contiguous().view(torch.int32).t().contiguous()
        qb = None
    else:
        codes, _, _ = w.unpacked()
        qa = _plane(codes & ((1 << bits_a) - 1), bits_a)
        qb = _plane(codes >> bits_a, bits_b)
    return IntKernelLayout(
        n=out, k=inp, bits=fmt.bits, bits_a=bits_a, bits_b=bits_b, group=fmt.group(inp), symmetric=fmt.symmetric,
        qa=qa, qb=qb, scales=w.scales.t().contiguous(),
        zeros=None if w.zeros is None else _zeros_t(w.zeros, fmt.bits, fmt.n_groups(inp)),
        perm=None if w.perm is None else w.perm.long(),
    )


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class WALayout:
    """What the weights-as-A kernel (:mod:`.triton.wa`) reads: row-major words, ``j * bits / 4`` words per block
    of ``8 j`` inputs (code positions ``t = 0..7`` of ``j`` inputs each). int4: input ``j t + 2 p + e`` (``t = 4 h +
    u``, ``p < j / 2``, ``e`` in 0, 1) is nibble ``4 e + u`` of the block's word ``h j / 2 + p``. int2 (and ternary):
    input ``j t + 2 p + e`` is code ``8 e + t`` of word ``p``. Either way one ``lop3`` of a word shifted by ``bits *
    u`` gives the pair of adjacent inputs ``(2p, 2p + 1)`` of a position in one register. int3 (two planes): a block
    is ``j / 2`` words of the low 2 bits as int2, then ``j / 4`` words of the high bit, input ``j t + 2 p + e`` at bit
    ``t + 8 (p % 2) + 16 e`` of high word ``p // 2`` (so word ``p // 2`` shifted by ``8 (p % 2) + t`` has the pair's
    high bits at 0 and 16, like the low plane's)."""

    n: int
    k: int
    j: int
    bits: int  # 4, 3 or 2
    group: int
    symmetric: bool
    q: torch.Tensor  # int32 [n, k * bits / 32] (int3: both planes, block by block)
    scales: torch.Tensor  # [n, n_groups], stored dtype; never 0 (a zero-scale group: codes = zero point, scale 1)
    zeros: torch.Tensor | None  # uint8 [n, n_groups], or None when symmetric

    @property
    def device(self) -> torch.device:
        return self.q.device


WA_JS = (64, 32)  # words per row per block of the weights-as-A layout, preferred first (H200 sweep, session 5)


def _wa_fits(k: int, group: int, j: int) -> bool:
    blk = 8 * j
    return k % blk == 0 and group % j == 0 and (group % blk == 0 or blk % group == 0)


def wa_block_words(k: int, group: int) -> int | None:
    """Words per row per block (``J``; blocks of ``8 J`` inputs) of the weights-as-A layout for ``k`` inputs in groups
    of ``group``: 64 where it fits (fastest at 1-16 rows on the H200 and H100), else 32, else ``None``."""
    return next((j for j in WA_JS if _wa_fits(k, group, j)), None)


def wa_reason(lay: IntKernelLayout, j: int | None = None) -> str | None:
    """``None`` if the weights-as-A kernel can run the weight behind ``lay`` (with blocks of ``8 j`` inputs, or
    the preferred ``j`` that fits)."""
    if not (lay.bits in (2, 4) and lay.qb is None or lay.bits == 3 and (lay.bits_a, lay.bits_b) == (2, 1)):
        return f"{lay.bits}-bit codes (the weights-as-A kernel takes 2-, 3- and 4-bit codes)"
    if not (_wa_fits(lay.k, lay.group, j) if j else wa_block_words(lay.k, lay.group)):
        return (f"in_features {lay.k} / group {lay.group} do not fit blocks of "
                f"{8 * j if j else ' or '.join(str(8 * v) for v in WA_JS)} inputs")
    return None


def check_wa_launch(k: int, group: int, bits: int, j: int, config) -> None:
    """Invariants of a "wa" launch, ``config = (BM, BN, SPLIT_K, warps, stages(, half))`` on blocks of ``8 j``
    inputs (``half``: int4 only)."""
    bm, bn, split_k = config[:3]
    assert bits in (2, 3, 4) and j >= 16 and _wa_fits(k, group, j), (bits, k, group, j)
    assert bm >= 8 and bm & (bm - 1) == 0 and bn >= 16 and bn & (bn - 1) == 0, (bm, bn)
    assert not (len(config) > 5 and config[5] and bits != 4), "half-block iterations are for 4-bit codes"
    assert 1 <= split_k <= k // (8 * j), (k, j, split_k)  # uneven splits are fine
    # Triton 3.6 miscompiles the K = 16 dot with N = 8 here (wrong results on the H200, session 5): never launch it
    assert not (j == 16 and bm == 8), "J = 16 with BM = 8 is miscompiled by Triton 3.6"


def wa_layout(lay: IntKernelLayout, j: int | None = None) -> WALayout:
    """One-time repack for :mod:`.triton.wa` from the integer kernel layout (same bytes as the codes); ``j``
    defaults to :func:`wa_block_words`."""
    assert wa_reason(lay, j) is None, wa_reason(lay, j)
    j = j or wa_block_words(lay.k, lay.group)
    assert j is not None
    n, k, bits = lay.n, lay.k, lay.bits
    codes = unpack_plane(lay.qa, lay.bits_a, k)  # [n, k] stored input order
    if lay.qb is not None:
        codes = codes | (unpack_plane(lay.qb, lay.bits_b, k) << lay.bits_a)
    scales = lay.scales.t().contiguous()
    zeros = None if lay.zeros is None else lay.zeros.t().contiguous()
    dead = scales == 0  # [n, n_groups]: such a group decodes to 0 whatever its codes
    if dead.any():  # codes := zero point, scale := 1 decodes to the same 0, and the kernel may divide by scales
        zp = zeros.long() if zeros is not None else torch.full_like(dead, 1 << (bits - 1), dtype=torch.long)
        gk = dead.repeat_interleave(lay.group, dim=1)
        codes = torch.where(gk, zp.repeat_interleave(lay.group, dim=1), codes)
        scales = scales.masked_fill(dead, 1)
    nb = k // (8 * j)
    if bits == 4:
        q = wa_pack4(codes, j)
    else:  # low 2 bits: block input j t + 2p + e -> word p, code 8e + t
        low = codes & 3 if bits == 3 else codes
        q = pack_codes(low.reshape(n, nb, 8, j // 2, 2).permute(0, 1, 3, 4, 2).reshape(n, k), 2).view(torch.int32)
        if bits == 3:  # high bit: block input j t + 2p + e, p = 2p' + h -> word p', bit 16e + 8h + t
            high = (codes >> 2).reshape(n, nb, 8, j // 4, 2, 2).permute(0, 1, 3, 5, 4, 2).reshape(n, k)
            qh = pack_codes(high, 1).view(torch.int32)
            q = torch.cat([q.reshape(n, nb, j // 2), qh.reshape(n, nb, j // 4)], dim=2)  # block by block
    return WALayout(
        n=n, k=k, j=j, bits=bits, group=lay.group, symmetric=lay.symmetric,
        q=q.reshape(n, k * bits // 32).contiguous(),
        scales=scales, zeros=zeros,
    )


def wa_pack4(codes: torch.Tensor, j: int) -> torch.Tensor:
    """4-bit codes ``[n, k]`` (stored input order) -> the weights-as-A words ``int32 [n, k/8]``: block input ``j t + 2p
    + e`` (``t = 4h + u``) is nibble ``4e + u`` of the block's word ``h j/2 + p``."""
    n, k = codes.shape
    blocks = codes.reshape(n, k // (8 * j), 2, 4, j // 2, 2).permute(0, 1, 2, 4, 5, 3)
    return pack_codes(blocks.reshape(n, k), 4).view(torch.int32).reshape(n, k // 8)


def _zeros_t(zeros: torch.Tensor, bits: int, n_groups: int) -> torch.Tensor:
    return unpack_codes(zeros, bits, n_groups).to(torch.uint8).t().contiguous()


def unpack_plane(q: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """``int32 [k*bits/32, n]`` words -> ``int64 [n, k]`` codes, exactly as the kernels unpack them."""
    per = 32 // bits
    shifts = torch.arange(per, device=q.device) * bits
    codes = (q.long().unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [k/per, per, n]
    return codes.reshape(-1, q.shape[1])[:k].t()


def layout_decode(lay: IntKernelLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[n, k]`` in the *stored* column order from the kernel layout (the kernels' arithmetic, in torch)."""
    q = unpack_plane(lay.qa, lay.bits_a, lay.k)
    if lay.qb is not None:
        q = q | (unpack_plane(lay.qb, lay.bits_b, lay.k) << lay.bits_a)
    s = lay.scales.float().t()
    z = torch.full_like(s, float(1 << (lay.bits - 1))) if lay.symmetric else lay.zeros.float().t()
    w = (q.float().reshape(lay.n, -1, lay.group) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(lay.n, lay.k).to(dtype)


def check_config(path: str, meta: list[int], config: list[int], m: int) -> None:
    """Internal invariants of a kernel launch (the dispatcher only builds valid ones; tests check that it does)."""
    k, bits, bits_a, bits_b, group, _ = meta
    if path == "wa":  # on the weights-as-A layout of this weight (blocks of 8 J inputs)
        j = wa_block_words(k, group)
        assert (bits_b == 0 or (bits_a, bits_b) == (2, 1)) and j is not None, (bits, bits_b, k, group)
        check_wa_launch(k, group, bits, j, config)
        return
    bm, bn, bk, split_k, _, _ = config
    assert path in ("gemv", "gemm", "gemmp", "mma4"), path
    assert bits_a in (1, 2, 4, 8) and bits_b in (0, 1, 2, 4) and bits_b <= bits_a, (bits_a, bits_b)
    assert bk >= 32 and bk & (bk - 1) == 0 and k % bk == 0, (k, bk)
    if path == "gemv" and bk > group:
        assert bk % group == 0, "a tile spans whole groups"
    else:
        assert bk <= group and group % bk == 0, "tiles lie inside one group"
    if path == "mma4":
        assert bits == 4 and bits_a == 4 and bits_b == 0 and bk >= 128, (bits, bk)
    if path == "gemmp":
        assert bits_b == 0 and bk // (32 // bits_a) >= 16, (bits_a, bits_b, bk)
    assert bn >= 16 and bn & (bn - 1) == 0, bn
    assert path == "gemv" or (bm >= 16 and bm & (bm - 1) == 0), bm
    assert split_k >= 1 and (k // bk) % split_k == 0, (k, bk, split_k)
