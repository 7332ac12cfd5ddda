"""Binary-coded weights (BCQ) through the weights-as-A scheme of :mod:`.wa` ("wa", session 13).

BCQ stores ``w = off_g + sum_i alpha_ig (2 b_i - 1)`` with ``q`` sign planes ``b_i`` and per-group scales. Per group
``g`` and batch row, with ``S_i = sum_k x_k b_ik`` and ``X_g = sum_k x_k`` over the group's inputs,
``y = sum_g [ sum_i (2 alpha_ig) S_i + (off_g - sum_i alpha_ig) X_g ]``. The kernel computes every ``S_i`` and ``X_g``
on the tensor cores (``X_g`` as a dot of a tile of ones: no layout change of the activations) into fp32 accumulators
and, at each group's end, adds them times the layout's fp32 ``2 alpha`` and ``off - sum alpha`` (``[q, N, G]``,
``[N, G]``). Planes are 1-bit codes in a weights-as-A layout (:func:`tensorslim.kernels.layout_ext.bcq_wa_layout`):
a block is ``16 J`` inputs, position ``t`` (0..15) covers inputs ``J t .. J t + J - 1``, and the pair of inputs ``J t
+ 2p, J t + 2p + 1`` sits at bits ``t`` and ``t + 16`` of word ``p``, so one shift and one ``lop3`` (:func:`.wa.
pair_tile` with ``BITS = 1``) give the bit pair as ``c + b`` in the dot operand's register, and ``- c`` gives the
bits exactly. The decode work is ``q`` times int1's (about int3's for ``q = 3``) against LUT-GEMM's table lookups.

The result is ``x @ decode()^T`` up to fp32 rounding (the sums are reassociated; measured ~1e-7 relative).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .wa import pair_tile, write_tile


@triton.jit
def _plane_dot(w, t: tl.constexpr, xt, s, DT: tl.constexpr, C: tl.constexpr, USE_ASM: tl.constexpr,
               BN: tl.constexpr, J: tl.constexpr):
    return tl.dot(pair_tile(w, t, DT, USE_ASM, BN, J, 1) - C, xt, s)


@triton.jit
def _group_sum(acc, s, a_ptr, g, nmask):
    a = tl.load(a_ptr + g, mask=nmask, other=0.0)
    return acc + a[:, None] * s


@triton.jit
def wa_bcq_kernel(
    x_ptr, out_ptr, p_ptr, a_ptr, c_ptr, ws_ptr, cnt_ptr,
    M, N, KW, NB, blocks_per_split, G, stride_xm, stride_om, stride_pq, stride_aq,
    Q: tl.constexpr, GROUP: tl.constexpr, J: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    USE_ASM: tl.constexpr, ATOMIC: tl.constexpr, SERIAL: tl.constexpr = False,
):
    tl.static_assert(Q >= 1 and Q <= 4)
    tl.static_assert(GROUP % J == 0 and (16 * J) % GROUP == 0)
    pid_m = tl.program_id(0)  # batch tiles fastest, as in wa_kernel
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    C: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
    BK: tl.constexpr = 16 * J  # inputs a block
    SEG: tl.constexpr = GROUP // J  # positions a group
    H: tl.constexpr = J // 2
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    wrow = p_ptr + (rn.to(tl.int64) * KW)[:, None] + tl.arange(0, H)[None, :]  # plane 0; plane i at + i stride_pq
    xrow = x_ptr + (rm.to(tl.int64) * stride_xm)[:, None] + tl.arange(0, J)[None, :]
    arow = a_ptr + rn.to(tl.int64) * G  # 2 alpha of plane 0; plane i at + i stride_aq
    crow = c_ptr + rn.to(tl.int64) * G
    ones = tl.full((BN, J), 1.0, DT)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    z = tl.zeros((BN, BM), dtype=tl.float32)
    s0, s1, s2, s3, sx = z, z, z, z, z
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    for b in range(b_lo, b_hi):
        w0 = tl.load(wrow + b * H, mask=nmask[:, None], other=0)
        if Q > 1:
            w1 = tl.load(wrow + stride_pq + b * H, mask=nmask[:, None], other=0)
        if Q > 2:
            w2 = tl.load(wrow + 2 * stride_pq + b * H, mask=nmask[:, None], other=0)
        if Q > 3:
            w3 = tl.load(wrow + 3 * stride_pq + b * H, mask=nmask[:, None], other=0)
        xb = xrow + b * BK
        for t in tl.static_range(16):
            xt = tl.trans(tl.load(xb + t * J, mask=mmask[:, None], other=0.0))
            s0 = _plane_dot(w0, t, xt, s0, DT, C, USE_ASM, BN, J)
            if Q > 1:
                s1 = _plane_dot(w1, t, xt, s1, DT, C, USE_ASM, BN, J)
            if Q > 2:
                s2 = _plane_dot(w2, t, xt, s2, DT, C, USE_ASM, BN, J)
            if Q > 3:
                s3 = _plane_dot(w3, t, xt, s3, DT, C, USE_ASM, BN, J)
            sx = tl.dot(ones, xt, sx)
            if t % SEG == SEG - 1:  # the group's last position: its sums times its fp32 factors, then reset
                g = (b * BK + t * J) // GROUP
                acc = _group_sum(acc, s0, arow, g, nmask)
                if Q > 1:
                    acc = _group_sum(acc, s1, arow + stride_aq, g, nmask)
                if Q > 2:
                    acc = _group_sum(acc, s2, arow + 2 * stride_aq, g, nmask)
                if Q > 3:
                    acc = _group_sum(acc, s3, arow + 3 * stride_aq, g, nmask)
                acc = _group_sum(acc, sx, crow, g, nmask)
                s0, s1, s2, s3, sx = z, z, z, z, z
    write_tile(acc, out_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, N, stride_om, pid_m, pid_n, ATOMIC, SERIAL)
