"""Integer-group GEMV (small batch): ``y = x W^T`` straight from packed codes, one activation row per program.

Design (FineQuant / FasterTransformer-style weight-only GEMV): program ``(m, n-block, k-split)`` owns ``BN`` output
columns of activation row ``m`` and a ``K / SPLIT_K`` slice of the inputs; ``m`` varies fastest over the grid, so
the programs of one weight tile run together and all but the first read it from L2. Per K tile (``BK`` inputs inside
one group) it loads the ``[BK/P, BN]`` int32 words of the transposed layout of :mod:`tensorslim.kernels.layout` once
each (lanes along N: coalesced), expands them in registers to a ``[BK/P, P, BN]`` code tensor (code ``t`` of word
``j`` is input ``j*P + t``; no reshape) and multiplies the integer weights ``q - z`` with the activations (loaded in
the same ``[BK/P, P]`` arrangement: contiguous, vectorized) in fp32, sums the tile and scales the ``[BN]`` partial
sums by the group scales. Candidates use ``BN >= 32 * num_warps`` so that lanes can own whole output columns and
the tile sum needs no cross-warp reduction (the layout Triton picks was not inspected). ``SPLIT_K > 1`` adds partial sums atomically
into a zeroed fp32 output (enough programs for small ``N``). An optional low-rank term ``t U^T`` (``t = x V^T``
computed before the call) is added by the ``pid_k == 0`` programs, so ``Sum(int, LowRank)`` needs no second pass
over ``y``. The helpers are shared with the tiled GEMM and dequantize.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes3(qa_ptr, qb_ptr, k0, offs_n, nmask, N,
                BITS_A: tl.constexpr, BITS_B: tl.constexpr, BK: tl.constexpr):
    """Codes ``[BK/PA, PA, BN]`` (int32) of inputs ``k0 + j*PA + t`` (element ``[j, t, n]``), ``PA = 32 / BITS_A``.

    Flattening the first two dims gives the natural input order, so activations load contiguously (vectorized).
    """
    PA: tl.constexpr = 32 // BITS_A
    JA: tl.constexpr = BK // PA
    ja = tl.arange(0, JA)
    ta = tl.arange(0, PA)
    wa = tl.load(qa_ptr + ((k0 // PA + ja).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :], other=0)
    q = (wa[:, None, :] >> (ta * BITS_A)[None, :, None]) & ((1 << BITS_A) - 1)
    if BITS_B > 0:
        # plane b: PB = 32 / BITS_B codes a word in natural order; input k = j*PA + t sits in word k // PB
        PB: tl.constexpr = 32 // BITS_B
        RB: tl.constexpr = PB // PA
        wb = tl.load(qb_ptr + ((k0 // PB + ja // RB).to(tl.int64) * N)[:, None] + offs_n[None, :],
                     mask=nmask[None, :], other=0)
        sh = ((ja % RB) * PA)[:, None] + ta[None, :]
        q = q | (((wb[:, None, :] >> (sh * BITS_B)[:, :, None]) & ((1 << BITS_B) - 1)) << BITS_A)
    return q


@triton.jit
def tile_k_offsets(BITS_A: tl.constexpr, BK: tl.constexpr):
    """``[BK/PA, PA]`` input offsets within a tile matching :func:`load_codes3` (``j*PA + t`` at ``[j, t]``)."""
    PA: tl.constexpr = 32 // BITS_A
    JA: tl.constexpr = BK // PA
    return tl.arange(0, JA)[:, None] * PA + tl.arange(0, PA)[None, :]


@triton.jit
def load_group(s_ptr, z_ptr, g, offs_n, nmask, N, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Scale (fp32) and zero point (int32) ``[BN]`` of group ``g``."""
    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.int32)
    else:
        z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)
    return s, z


@triton.jit
def int_gemv_kernel(
    x_ptr, out_ptr, qa_ptr, qb_ptr, s_ptr, z_ptr, t_ptr, u_ptr,
    M, N, K, R, k_split, GROUP, SPLIT_K,
    stride_xm, stride_om, stride_tm, stride_un,
    BITS: tl.constexpr, BITS_A: tl.constexpr, BITS_B: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_LR: tl.constexpr, BR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    koff = tile_k_offsets(BITS_A, BK)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        q = load_codes3(qa_ptr, qb_ptr, k0, offs_n, nmask, N, BITS_A, BITS_B, BK)
        s, z = load_group(s_ptr, z_ptr, k0 // GROUP, offs_n, nmask, N, BITS, SYMMETRIC)
        x = tl.load(x_row + k0 + koff).to(tl.float32)
        part = tl.sum(tl.sum(x[:, :, None] * (q - z[None, None, :]).to(tl.float32), axis=0), axis=0)
        acc += part * s
    y = acc
    if HAS_LR:
        if pid_k == 0:
            rs = tl.arange(0, BR)
            t = tl.load(t_ptr + m.to(tl.int64) * stride_tm + rs, mask=rs < R, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs_n[None, :].to(tl.int64) * stride_un + rs[:, None],
                        mask=nmask[None, :] & (rs[:, None] < R), other=0.0).to(tl.float32)
            y += tl.sum(t[:, None] * u, axis=0)
    optr = out_ptr + m.to(tl.int64) * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(optr, y, mask=nmask)
