"""Weight-only multiplies for float element codes: FP8 (E4M3/E5M2), MXFP4/MXFP8 (E8M0 block scales) and NVFP4.

``y = x W^T`` straight from the stored codes, never materializing ``W``. The kernel layout (:mod:`..layout_ext`) is
the transposed word layout of the integer kernels: ``q[K*b/32, N]`` int32, word ``(j, n)`` holds elements
``j*P .. j*P+P-1`` of output ``n`` (``P = 32/b``, ``b`` = 4 for E2M1, 8 for FP8), element ``j*P+t`` at bits ``t*b``
(the stored little-endian rows viewed as int32, transposed: lanes along N, coalesced).

Element decode, in registers, by bit arithmetic (no float8 dtypes, so the CPU interpreter and every Triton run the
same code): the element's exponent and mantissa bits are moved into an fp16 bit pattern and bitcast; the fp16 value
is the element times a fixed power of two (``2^-14`` E2M1, ``2^-8`` E4M3, 1 for E5M2) with subnormals mapping onto
fp16 subnormals, so the conversion to fp32 is exact for every code (no flush-to-zero can touch it). The power of
two is folded into the scale. E4M3's NaN code (0x7F) decodes to 480; the encoders saturate and never store it.

Scales (``SCALE``): 0 = float scales ``[n_groups, N]`` (FP8; fp32), 1 = E8M0 codes (MX; ``2^(e-127)`` built as fp32
bits ``e << 23``; ``e = 0`` gives ``2^-127``), 2 = E4M3 codes (NVFP4) with the per-tensor ``g``: ``y /= g`` once at
the end (the reference divides each block scale by ``g``; the results differ by fp32 rounding only).

GEMV (1-16 rows; program = one activation row x ``BN`` outputs x a K slice): per K tile, for each element position
``t`` (unrolled) one shift/mask, the fp16 bit build, a convert and an FMA with ``x[k0 + j*P + t]`` into per-word-row
partial sums; the word row's scale multiplies its partial sum (``GROUP % P == 0``: a word lies in one block).
GEMM (tensor cores): the ``[BK, BN]`` tile of true element values (exact in bf16 and fp16) goes to one ``tl.dot``
with fp32 accumulation. ``PRE_SCALE``: the block scales are multiplied into the tile before the dot, used only where
the product is exact in the activation dtype (E2M1 x E4M3: <= 6 significant bits, in fp16 range; E2M1/E4M3 x 2^e in
bf16), so tiles may span several small blocks (NVFP4's 16); otherwise the tile lies in one group and the partial
product is scaled in fp32 after the dot. ``ATOMIC`` (split-K: ``k_split < K``) adds partial sums atomically into a
zeroed fp32 output; the split factor itself is a runtime argument, so it costs no extra compile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import store_row, store_rows, tile_rows_cols


@triton.jit
def elem_fp16(c, ELEM: tl.constexpr):
    """fp32 value of element codes ``c`` (int32, ``b`` low bits) times :func:`elem_factor`'s inverse."""
    if ELEM == 0:  # E2M1: sign -> bit 15, exponent+mantissa (3 bits) -> bits 9..11
        h = ((c & 0x8) << 12) | ((c & 0x7) << 9)
    elif ELEM == 1:  # E4M3: sign -> bit 15, exponent+mantissa (7 bits) -> bits 7..13
        h = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    else:  # E5M2 is the top byte of an fp16
        h = (c & 0xFF) << 8
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def elem_factor(ELEM: tl.constexpr):
    """The power of two that turns :func:`elem_fp16` into the element's value."""
    if ELEM == 0:
        return 16384.0
    elif ELEM == 1:
        return 256.0
    else:
        return 1.0


@triton.jit
def load_scale(ptrs, mask, SCALE: tl.constexpr):
    """Block scales (fp32) at ``ptrs``; for NVFP4 the E4M3 code's value (the ``1/g`` comes at the end)."""
    if SCALE == 0:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    elif SCALE == 1:
        e = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
        return tl.where(e == 0, 5.877471754111438e-39, s)  # 2^-127 (an fp32 subnormal)
    else:
        e = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        return elem_fp16(e, 1) * 256.0


@triton.jit
def float_gemv_kernel(
    x_ptr, out_ptr, q_ptr, s_ptr, gs_ptr,
    M, N, K, k_split, GROUP,
    stride_xm, stride_om,
    ELEM: tl.constexpr, SCALE: tl.constexpr, ATOMIC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    BITS: tl.constexpr = 4 if ELEM == 0 else 8
    P: tl.constexpr = 32 // BITS
    JA: tl.constexpr = BK // P
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    ja = tl.arange(0, JA)
    acc = tl.zeros((JA, BN), dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        w = tl.load(q_ptr + ((k0 // P + ja).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :],
                    other=0)
        xp = x_row + k0 + ja * P
        part = tl.zeros((JA, BN), dtype=tl.float32)
        for t in tl.static_range(P):
            xt = tl.load(xp + t).to(tl.float32)
            part += xt[:, None] * elem_fp16((w >> (t * BITS)) & ((1 << BITS) - 1), ELEM)
        gj = ((k0 + ja * P) // GROUP).to(tl.int64) * N
        acc += part * load_scale(s_ptr + gj[:, None] + offs_n[None, :], nmask[None, :], SCALE)
    y = tl.sum(acc, axis=0) * elem_factor(ELEM)
    if SCALE == 2:
        y = y / tl.load(gs_ptr)
    store_row(y, out_ptr, m, stride_om, offs_n, nmask, ATOMIC)


@triton.jit
def float_gemm_kernel(
    x_ptr, out_ptr, q_ptr, s_ptr, gs_ptr,
    M, N, K, k_split, GROUP,
    stride_xm, stride_om,
    ELEM: tl.constexpr, SCALE: tl.constexpr, ATOMIC: tl.constexpr, PRE_SCALE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    BITS: tl.constexpr = 4 if ELEM == 0 else 8
    P: tl.constexpr = 32 // BITS
    JA: tl.constexpr = BK // P
    ms, mmask, offs_n, nmask = tile_rows_cols(pid_m, pid_n, M, N, BM, BN)
    ja = tl.arange(0, JA)
    shifts = tl.arange(0, P) * BITS
    koff = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + ms[:, None] * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        w = tl.load(q_ptr + ((k0 // P + ja).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :],
                    other=0)
        c = (w[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [JA, P, BN]: input j*P + t
        v = tl.reshape(elem_fp16(c, ELEM), (BK, BN)) * elem_factor(ELEM)  # true element values
        x = tl.load(x_rows + (k0 + koff)[None, :], mask=mmask[:, None], other=0.0)
        if PRE_SCALE:
            g = ((k0 + koff) // GROUP).to(tl.int64) * N
            s = load_scale(s_ptr + g[:, None] + offs_n[None, :], nmask[None, :], SCALE)
            acc += tl.dot(x, (v * s).to(x_ptr.dtype.element_ty))
        else:
            s = load_scale(s_ptr + (k0 // GROUP) * N + offs_n, nmask, SCALE)
            acc += tl.dot(x, v.to(x_ptr.dtype.element_ty)) * s[None, :]
    if SCALE == 2:
        acc = acc / tl.load(gs_ptr)
    store_rows(acc, out_ptr, ms, stride_om, offs_n, mmask, nmask, ATOMIC)
