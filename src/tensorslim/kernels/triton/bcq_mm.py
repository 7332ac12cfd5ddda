"""Binary-coded weights (BCQ): a LUT-GEMM GEMV and a sign-plane tensor-core GEMM.

``w = offset + sum_i alpha_i b_i`` per group (``b_i`` in {-1, +1}). Layout (:mod:`..layout_ext`): sign planes
``[q, K/32, N]`` int32 (bit ``b`` of word ``j`` = input ``32j + b``; 1 = +1), alphas ``[q, n_groups, N]``, offsets
``[n_groups, N]``.

LUT-GEMM (Park et al., arXiv 2206.09557), batch 1-16: :func:`bcq_lut_kernel` tabulates, for every run of 8
activations of a row, the 256 signed sums ``T[byte] = sum_j x_j (2 bit_j(byte) - 1)`` (fp32, ``[M, K/8, 256]``: 128
bytes an input a row, L2-resident for one row of a 7B layer). :func:`bcq_lut_gemv_kernel` then replaces 8 multiply-
adds a plane by one table lookup: per word (32 inputs, 4 bytes) and plane, 4 gathers ``T[byte]`` from the row's table
(indices computed per output column; the tables of one K tile are a few KB, so the gathers hit L1) summed and
multiplied by ``alpha_i`` of the word's group; the offset term is ``offset * sum x``, with ``sum x = T[0xFF]``. In
Triton the tables live in global memory (L1/L2), not shared memory as in the CUDA original: Triton has no indexed
shared-memory gather, so the lookups are ordinary cached loads.

Sign-plane GEMM (any batch): per K tile (inside one group) each plane's bits become a ``[BK, BN]`` +-1 tile (exact in
bf16/fp16), one ``tl.dot`` a plane with fp32 accumulation, times ``alpha_i`` after the dot; plus ``offset * sum x``.
``q`` dots a tile: more tensor-core work than a dense GEMM, but small batches are bound by memory, not MMA.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import store_row, store_rows, tile_rows_cols


@triton.jit
def bcq_lut_kernel(x_ptr, lut_ptr, K, stride_xm, BB: tl.constexpr):
    """``lut[m, b, e] = sum_{j<8} x[m, 8b + j] * (+1 if bit j of e else -1)``; grid ``(M, cdiv(K/8, BB))``."""
    m = tl.program_id(0)
    pid = tl.program_id(1)
    nb = K // 8
    b = pid * BB + tl.arange(0, BB)
    bmask = b < nb
    e = tl.arange(0, 256)
    lut = tl.zeros((BB, 256), dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    for j in tl.static_range(8):
        xj = tl.load(x_row + b * 8 + j, mask=bmask, other=0.0).to(tl.float32)
        sgn = ((e >> j) & 1).to(tl.float32) * 2.0 - 1.0
        lut += xj[:, None] * sgn[None, :]
    rows = (m.to(tl.int64) * nb + b) * 256
    tl.store(lut_ptr + rows[:, None] + e[None, :], lut, mask=bmask[:, None])


@triton.jit
def bcq_lut_gemv_kernel(
    lut_ptr, out_ptr, p_ptr, a_ptr, o_ptr,
    M, N, K, k_split, GROUP, NG,
    stride_om,
    Q: tl.constexpr, ATOMIC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    JA: tl.constexpr = BK // 32
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    ja = tl.arange(0, JA)
    KW = K // 32
    lut_row = lut_ptr + m.to(tl.int64) * (K // 8) * 256
    acc = tl.zeros((JA, BN), dtype=tl.float32)
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        j = k0 // 32 + ja  # word rows of this tile
        g = ((k0 + ja * 32) // GROUP).to(tl.int64)
        sx = tl.zeros((JA,), dtype=tl.float32)
        for t in tl.static_range(4):
            sx += tl.load(lut_row + (j * 4 + t).to(tl.int64) * 256 + 255)
        o = tl.load(o_ptr + (g * N)[:, None] + offs_n[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
        part = sx[:, None] * o
        for i in tl.static_range(Q):
            w = tl.load(p_ptr + ((i * KW + j).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :],
                        other=0)
            pi = tl.zeros((JA, BN), dtype=tl.float32)
            for t in tl.static_range(4):
                byte = (w >> (8 * t)) & 0xFF
                pi += tl.load(lut_row + ((j * 4 + t).to(tl.int64) * 256)[:, None] + byte)
            a = tl.load(a_ptr + ((i * NG + g) * N)[:, None] + offs_n[None, :], mask=nmask[None, :],
                        other=0.0).to(tl.float32)
            part += pi * a
        acc += part
    y = tl.sum(acc, axis=0)
    store_row(y, out_ptr, m, stride_om, offs_n, nmask, ATOMIC)


@triton.jit
def bcq_gemm_kernel(
    x_ptr, out_ptr, p_ptr, a_ptr, o_ptr,
    M, N, K, k_split, GROUP, NG,
    stride_xm, stride_om,
    Q: tl.constexpr, ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    JA: tl.constexpr = BK // 32
    ms, mmask, offs_n, nmask = tile_rows_cols(pid_m, pid_n, M, N, BM, BN)
    ja = tl.arange(0, JA)
    bit = tl.arange(0, 32)
    koff = tl.arange(0, BK)
    KW = K // 32
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + ms[:, None] * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        x = tl.load(x_rows + (k0 + koff)[None, :], mask=mmask[:, None], other=0.0)
        g = k0 // GROUP
        o = tl.load(o_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * o[None, :]
        for i in tl.static_range(Q):
            w = tl.load(p_ptr + ((i * KW + k0 // 32 + ja).to(tl.int64) * N)[:, None] + offs_n[None, :],
                        mask=nmask[None, :], other=0)
            b = (w[:, None, :] >> bit[None, :, None]) & 1  # [JA, 32, BN]: input 32j + bit
            sg = tl.reshape(b * 2 - 1, (BK, BN)).to(x_ptr.dtype.element_ty)
            a = tl.load(a_ptr + (i * NG + g) * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc += tl.dot(x, sg) * a[None, :]
    store_rows(acc, out_ptr, ms, stride_om, offs_n, mmask, nmask, ATOMIC)
