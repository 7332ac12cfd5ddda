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
def magic128(w, T: tl.constexpr, BITS: tl.constexpr, LO: tl.constexpr):
    """Code ``T`` of the int32 words ``w`` as the fp32 value ``128 + q * 2^(p - 16)`` with no int->float conversion:
    the word is shifted so the code lands at mantissa bit ``p`` (``LO <= p``, ``p + BITS <= 23``; codes that share a
    shift are CSE'd) and masked into the bits of 128.0 (one ``lop3``). The caller scales the activation by
    ``2^(16 - p)`` (:func:`magic128_pos`, exact) and subtracts ``128 * sum(scaled x)`` once per word row: the offset is
    at most ``2^(23 - LO)`` times a code step, ~1e-5 relative after cancellation in fp32."""
    S: tl.constexpr = (23 - LO) // BITS  # codes per shift
    P: tl.constexpr = LO + (T % S) * BITS
    SHIFT: tl.constexpr = LO - (T // S) * S * BITS
    if SHIFT > 0:
        v = w << SHIFT
    elif SHIFT < 0:
        v = w >> (-SHIFT)
    else:
        v = w
    return ((v & (((1 << BITS) - 1) << P)) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def magic128_scale(T: tl.constexpr, BITS: tl.constexpr, LO: tl.constexpr):
    """``2^(16 - p)`` for code ``T`` of :func:`magic128`."""
    S: tl.constexpr = (23 - LO) // BITS
    P: tl.constexpr = LO + (T % S) * BITS
    return 1.0 * (1 << (16 - P)) if P <= 16 else 1.0 / (1 << (P - 16))


@triton.jit
def int_gemv_kernel(
    x_ptr, out_ptr, qa_ptr, qb_ptr, s_ptr, z_ptr, t_ptr, u_ptr,
    M, N, K, R, k_split, GROUP, SPLIT_K,
    stride_xm, stride_om, stride_tm, stride_un,
    BITS: tl.constexpr, BITS_A: tl.constexpr, BITS_B: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_LR: tl.constexpr, BR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One activation row per program over a ``[BK/PA, BN]`` tile of words (2-D only: no layout changes in the
    loop). For each code position ``t`` (unrolled) the codes come out of the words by :func:`magic128` and one FMA
    with the (power-of-two scaled) activations ``x[k0 + j*PA + t]`` adds them into per-word-row partial sums; the
    magic offset and the zero point are folded out (``sum x (q - z) = sum x q - z sum x``) and the group scale applied
    once per word row, so a weight costs ~2.5 instructions (shift/2, lop3, fma). A tile may span several groups (``BK > GROUP``, per-row scales). Word rows are reduced
    once, after the loop."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PA: tl.constexpr = 32 // BITS_A
    JA: tl.constexpr = BK // PA
    LA: tl.constexpr = 12 if BITS_A >= 4 else 14  # lowest mantissa bit a code is moved to (magic128)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    ja = tl.arange(0, JA)
    acc = tl.zeros((JA, BN), dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        wa = tl.load(qa_ptr + ((k0 // PA + ja).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :],
                     other=0)
        if BITS_B > 0:
            PB: tl.constexpr = 32 // BITS_B
            RB: tl.constexpr = PB // PA
            LB: tl.constexpr = 14
            wb = tl.load(qb_ptr + ((k0 // PB + ja // RB).to(tl.int64) * N)[:, None] + offs_n[None, :],
                         mask=nmask[None, :], other=0)
            wb = wb >> (((ja % RB) * (PA * BITS_B))[:, None])  # this row's PA codes at the bottom of the word
        xp = x_row + k0 + ja * PA
        part = tl.zeros((JA, BN), dtype=tl.float32)
        sx = tl.zeros((JA,), dtype=tl.float32)
        sc = tl.zeros((JA,), dtype=tl.float32)  # sum of the scaled activations: times 128 it is the magic offset
        for t in tl.static_range(PA):
            xt = tl.load(xp + t).to(tl.float32)
            sx += xt
            xa = xt * magic128_scale(t, BITS_A, LA)
            sc += xa
            part += xa[:, None] * magic128(wa, t, BITS_A, LA)
            if BITS_B > 0:
                xb = xt * ((1 << BITS_A) * magic128_scale(t, BITS_B, LB))
                sc += xb
                part += xb[:, None] * magic128(wb, t, BITS_B, LB)
        part -= (sc * 128.0)[:, None]
        if BK <= GROUP:  # the tile lies in one group
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
            if SYMMETRIC:
                acc += (part - sx[:, None] * (1 << (BITS - 1))) * s[None, :]
            else:
                z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32)
                acc += (part - sx[:, None] * z[None, :]) * s[None, :]
        else:  # word row j lies in group (k0 + j*PA) // GROUP
            gj = ((k0 + ja * PA) // GROUP).to(tl.int64) * N
            s2 = tl.load(s_ptr + gj[:, None] + offs_n[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
            if SYMMETRIC:
                acc += (part - sx[:, None] * (1 << (BITS - 1))) * s2
            else:
                z2 = tl.load(z_ptr + gj[:, None] + offs_n[None, :], mask=nmask[None, :], other=0).to(tl.float32)
                acc += (part - sx[:, None] * z2) * s2
    y = tl.sum(acc, axis=0)
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
