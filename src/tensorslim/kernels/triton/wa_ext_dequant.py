"""Dense ``W [N, K]`` in the activation dtype from the MXFP4 / NVFP4 / BCQ weights-as-A repacks
(:class:`tensorslim.kernels.layout_ext.FP4WALayout`, :class:`~tensorslim.kernels.layout_ext.BCQWALayout`), for the
dispatcher's "dequant" path at many rows (decode once, then cuBLAS), as :mod:`.wa_dequant` does for the integer
repack. A prepared module (``CompressedLinear.prepare_kernels``) keeps only the repack, so without this its only
path at 64+ rows was "wa", which is far slower than bf16 there for BCQ (0.07x at 256 rows, session 14).

One program a ``[BN, block]`` tile: the words are read once and decoded with plain Triton arithmetic (no inline
PTX, so the interpreter runs exactly this code): a code position ``t`` of a block is a contiguous ``[BN, J]`` run of
inputs ``block_start + J t ..``, stored as one tile.
- MXFP4 / NVFP4: :func:`.wa_fp4.fp4_tile` / :func:`.wa_fp4.nv_tile` in their plain form give element x block scale
  (NVFP4: x ``2^-8`` / ``2^-7``) exactly in the output dtype; NVFP4 is then multiplied by that power of two and
  ``1/g`` in fp32 and rounded once. MX needs the layout's exponent range to suit the dtype
  (``FP4WALayout.dtype_ok``), as "wa" does.
- BCQ: ``w = (off - sum alpha) + sum_i (2 alpha_i) b_i`` in fp32 from the layout's ``c`` and ``a2``, rounded once.
So each weight is ``decode()`` up to fp32 rounding order, rounded once to the output dtype (as the "reference" path
rounds ``decode()``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .wa_fp4 import fp4_tile, nv_tile


@triton.jit
def round_to(v, DT: tl.constexpr):
    """fp32 ``v`` (finite) rounded to nearest-even in ``DT``. bf16 by integer arithmetic on the bits: Triton's
    interpreter truncates fp32 -> bf16 conversions (seen with Triton 3.8), and the CI tests must run what the GPU
    runs."""
    if DT == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(DT)


@triton.jit
def fp4_wa_dequant_kernel(
    q_ptr, e_ptr, out_ptr, N, KW, G, stride_on, post,
    GROUP: tl.constexpr, J: tl.constexpr, BN: tl.constexpr, NV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)  # block of 8 J inputs
    DT: tl.constexpr = out_ptr.dtype.element_ty
    H: tl.constexpr = J // 2
    BK: tl.constexpr = 8 * J
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    base = q_ptr + (rn.to(tl.int64) * KW)[:, None] + b * J + tl.arange(0, H)[None, :]
    w_lo = tl.load(base, mask=nmask[:, None], other=0)  # positions 0..3
    w_hi = tl.load(base + H, mask=nmask[:, None], other=0)  # positions 4..7
    erow = e_ptr + rn.to(tl.int64) * G
    orow = out_ptr + (rn.to(tl.int64) * stride_on)[:, None] + (b * BK + tl.arange(0, J))[None, :]
    FIX: tl.constexpr = 256.0 if DT == tl.bfloat16 else 128.0  # NVFP4: nv_tile's 2^-8 (2^-7) back
    for u in tl.static_range(4):
        if NV:
            lo = nv_tile(w_lo, erow + (b * BK + u * J) // GROUP, nmask, u, DT, False, BN, J, GROUP)
            hi = nv_tile(w_hi, erow + (b * BK + (u + 4) * J) // GROUP, nmask, u, DT, False, BN, J, GROUP)
            lo = round_to(lo.to(tl.float32) * (post * FIX), DT)
            hi = round_to(hi.to(tl.float32) * (post * FIX), DT)
        else:
            e_lo = tl.load(erow + (b * BK + u * J) // GROUP, mask=nmask, other=127).to(tl.int32)
            e_hi = tl.load(erow + (b * BK + (u + 4) * J) // GROUP, mask=nmask, other=127).to(tl.int32)
            lo = fp4_tile(w_lo, e_lo, u, DT, False, BN, J)
            hi = fp4_tile(w_hi, e_hi, u, DT, False, BN, J)
        tl.store(orow + u * J, lo, mask=nmask[:, None])
        tl.store(orow + (u + 4) * J, hi, mask=nmask[:, None])


@triton.jit
def _plane_bits(w, t: tl.constexpr, BN: tl.constexpr, J: tl.constexpr):
    """Words ``[BN, J/2]`` of one plane -> the ``[BN, J]`` bits of position ``t`` (fp32): element ``(n, 2p + h)`` is
    bit ``t + 16 h`` of word ``(n, p)``."""
    v2 = tl.reshape(tl.join(w, w), (BN, J))
    h = tl.arange(0, J) % 2
    return ((v2 >> (t + 16 * h)[None, :]) & 1).to(tl.float32)


@triton.jit
def bcq_wa_dequant_kernel(
    p_ptr, a_ptr, c_ptr, out_ptr, N, KW, G, stride_on, stride_pq, stride_aq,
    Q: tl.constexpr, GROUP: tl.constexpr, J: tl.constexpr, BN: tl.constexpr,
):
    tl.static_assert(Q >= 1 and Q <= 4)
    pid_n = tl.program_id(0)
    b = tl.program_id(1)  # block of 16 J inputs
    DT: tl.constexpr = out_ptr.dtype.element_ty
    H: tl.constexpr = J // 2
    BK: tl.constexpr = 16 * J
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    wrow = p_ptr + (rn.to(tl.int64) * KW)[:, None] + b * H + tl.arange(0, H)[None, :]  # plane i at + i stride_pq
    w0 = tl.load(wrow, mask=nmask[:, None], other=0)
    if Q > 1:
        w1 = tl.load(wrow + stride_pq, mask=nmask[:, None], other=0)
    if Q > 2:
        w2 = tl.load(wrow + 2 * stride_pq, mask=nmask[:, None], other=0)
    if Q > 3:
        w3 = tl.load(wrow + 3 * stride_pq, mask=nmask[:, None], other=0)
    arow = a_ptr + rn.to(tl.int64) * G  # 2 alpha of plane 0; plane i at + i stride_aq
    crow = c_ptr + rn.to(tl.int64) * G
    orow = out_ptr + (rn.to(tl.int64) * stride_on)[:, None] + (b * BK + tl.arange(0, J))[None, :]
    for t in tl.static_range(16):
        g = (b * BK + t * J) // GROUP
        w = tl.load(crow + g, mask=nmask, other=0.0)[:, None] \
            + tl.load(arow + g, mask=nmask, other=0.0)[:, None] * _plane_bits(w0, t, BN, J)
        if Q > 1:
            w += tl.load(arow + stride_aq + g, mask=nmask, other=0.0)[:, None] * _plane_bits(w1, t, BN, J)
        if Q > 2:
            w += tl.load(arow + 2 * stride_aq + g, mask=nmask, other=0.0)[:, None] * _plane_bits(w2, t, BN, J)
        if Q > 3:
            w += tl.load(arow + 3 * stride_aq + g, mask=nmask, other=0.0)[:, None] * _plane_bits(w3, t, BN, J)
        tl.store(orow + t * J, round_to(w, DT), mask=nmask[:, None])
