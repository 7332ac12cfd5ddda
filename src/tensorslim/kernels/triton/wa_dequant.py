"""Dense ``W [N, K]`` from the weights-as-A layout (:func:`tensorslim.kernels.layout.wa_layout`), for the dispatcher's
"dequant" path on weights whose only kernel copy is that layout (many rows: decode once, then cuBLAS).

One program a ``[BN, 8 J]`` block: the word tiles are read once and unpacked with the same helpers as the "wa" kernel
(:func:`.wa.pair_tile`, :func:`.wa.pair_tile3`, :func:`.wa.load_group_rows`), so ``c + q`` and ``c + z`` are the
kernel's exact values; ``(q - z)`` (exact in the activation dtype) times the group scale in fp32, rounded once to
the output dtype, as the older transposed-layout dequantizer does. Code position ``t`` of the block is a contiguous
``[BN, J]`` run of inputs ``8 J b + J t ..``, stored as one tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .wa import load_group_rows, pair_tile, pair_tile3


@triton.jit
def wa_dequant_kernel(
    q_ptr, s_ptr, z_ptr, out_ptr, N, KW, G, stride_on,
    SYMMETRIC: tl.constexpr, GROUP: tl.constexpr, J: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)  # block of 8 J inputs
    DT: tl.constexpr = out_ptr.dtype.element_ty
    C: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
    H: tl.constexpr = J // 2
    WPB: tl.constexpr = J * BITS // 4
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    base = q_ptr + (rn.to(tl.int64) * KW)[:, None] + b * WPB
    w_lo = tl.load(base + tl.arange(0, H)[None, :], mask=nmask[:, None], other=0)
    if BITS == 4:
        w_hi = tl.load(base + H + tl.arange(0, H)[None, :], mask=nmask[:, None], other=0)
    if BITS == 3:
        wq = tl.load(base + H + tl.arange(0, J // 4)[None, :], mask=nmask[:, None], other=0)
        wh = tl.reshape(tl.join(wq, wq >> 8), (BN, H))
    srow = s_ptr + rn.to(tl.int64) * G
    zrow = z_ptr + rn.to(tl.int64) * G
    orow = out_ptr + (rn.to(tl.int64) * stride_on)[:, None] + (b * 8 * J + tl.arange(0, J))[None, :]
    for t in tl.static_range(8):
        s, zc = load_group_rows(srow, zrow, (b * 8 * J + t * J) // GROUP, nmask, DT, C, SYMMETRIC, BITS)
        if BITS == 4:
            if t < 4:
                cq = pair_tile(w_lo, t, DT, USE_ASM, BN, J, BITS)
            else:
                cq = pair_tile(w_hi, t - 4, DT, USE_ASM, BN, J, BITS)
        elif BITS == 3:
            cq = pair_tile3(w_lo, wh, t, DT, USE_ASM, BN, J)
        else:
            cq = pair_tile(w_lo, t, DT, USE_ASM, BN, J, BITS)
        w = (cq - zc[:, None]).to(tl.float32) * s[:, None]
        tl.store(orow + t * J, w.to(DT), mask=nmask[:, None])
