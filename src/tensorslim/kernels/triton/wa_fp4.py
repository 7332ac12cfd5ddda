"""MXFP4 (E2M1 codes, E8M0 block scales; session 12) and NVFP4 (E2M1 codes, E4M3 scales of 16-blocks, a per-tensor
``g``; session 13) through the weights-as-A scheme of :mod:`.wa` ("wa").

Layout (:func:`tensorslim.kernels.layout_ext.fp4_wa_layout`): exactly int4's weights-as-A layout (the 4-bit codes
permuted so that, for code position ``u``, one shift puts the pair of adjacent inputs ``(2p, 2p + 1)`` at bits ``4u``
and ``4u + 16`` of a word), with E2M1 codes (sign in bit 3) instead of integers, and the scale bytes ``[N, G]``
row-major. MX: ``J = 32`` (or 64) words a block row for MX's 32-input blocks, so each code position of a block lies
in one scale block. NVFP4: ``J = 32``, so each code position holds two 16-blocks, columns 0-15 and 16-31.

Decode of a code pair on the GPU (inline PTX, one 32-bit register in and the dot operand's register out): the 3
magnitude bits ``e1 e0 m0`` go to the low two exponent bits and the top mantissa bit of each half (bits 6-8 of a
bf16, 9-11 of an fp16) and the sign to bit 15, so each half is the element times ``2^-126`` (bf16) or ``2^-14`` (fp16)
exactly, the zero-exponent codes (0, 0.5) landing on subnormals (two shifts, an ``and``, a ``lop3``). One packed
multiply by the pair's multiplier then scales it, exactly and to a normal number:
- MX: ``2^(e - 1)`` (bf16) or ``2^(e - 113)`` (fp16) gives the element times its block scale, where the layout's
  exponent range allows it (``fp4_wa_layout`` records for which activation dtypes it does; the dispatcher offers
  this path only for those);
- NVFP4: ``s_b 2^118`` (bf16) or ``s_b 2^7`` (fp16), built from the E4M3 bits (:func:`nv_tile`), gives the element
  times ``s_b 2^-8`` (``2^-7``): 2 significant bits times 4 fit either dtype and the range holds for every finite
  E4M3 scale, subnormal ones included, so NVFP4 has no exponent condition. The fp32 accumulator is multiplied by
  ``2^8 / g`` (``2^7 / g``) at the end.
The scale is thus inside the tile, so the dots of a whole split chain into one fp32 accumulator with no per-block
rescaling. Five instructions a code pair against int4's three (no zero point, but a sign and a multiply).

Under Triton's interpreter (CI) the same tiles come from plain Triton: the element via the fp16 bit build of
:func:`.float_mm.elem_fp16` and the scale as ``2^(e - 127)`` (MX) or ``s_b 2^-8`` (NVFP4) in fp32, all exact in the
activation dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .float_mm import elem_fp16
from .wa import write_tile

# per code position u (pair at bits 4u, 4u + 16): magnitude bits -> 6..8 (bf16) / 9..11 (fp16), sign bit -> 15, then
# times the block's multiplier pair ($3): as a packed multiply in the asm (Triton 3.6 emits two scalar bf16 multiplies)
_BF16 = [tl.constexpr(
    "{ .reg .b32 m, s; " + (f"shl.b32 m, $1, {6 - 4 * u}; " if u < 2 else f"shr.u32 m, $1, {4 * u - 6}; ")
    + (f"shl.b32 s, $1, {12 - 4 * u}; " if u < 3 else "mov.b32 s, $1; ")
    + "and.b32 m, m, 0x01C001C0; lop3.b32 m, m, s, 0x80008000, 0xF8; mul.rn.bf16x2 $0, m, $3; }") for u in range(4)]
_FP16 = [tl.constexpr(
    "{ .reg .b32 m, s; " + (f"shl.b32 m, $1, {9 - 4 * u}; " if u < 3 else "shr.u32 m, $1, 3; ")
    + (f"shl.b32 s, $1, {12 - 4 * u}; " if u < 3 else "mov.b32 s, $1; ")
    + "and.b32 m, m, 0x0E000E00; lop3.b32 m, m, s, 0x80008000, 0xF8; mul.rn.f16x2 $0, m, $3; }") for u in range(4)]
_BF16_0, _BF16_1, _BF16_2, _BF16_3 = _BF16
_FP16_0, _FP16_1, _FP16_2, _FP16_3 = _FP16


@triton.jit
def _asm_pairs(v2, mb, u: tl.constexpr, DT: tl.constexpr):
    """One packed code pair a 32-bit register, times the multiplier pair ``mb`` -> the pair of elements times their
    block scale."""
    if DT == tl.bfloat16:
        if u == 0:
            return tl.inline_asm_elementwise(_BF16_0, "=r,r,r,r", [v2, mb], dtype=tl.bfloat16,
                                             is_pure=True, pack=2)
        elif u == 1:
            return tl.inline_asm_elementwise(_BF16_1, "=r,r,r,r", [v2, mb], dtype=tl.bfloat16,
                                             is_pure=True, pack=2)
        elif u == 2:
            return tl.inline_asm_elementwise(_BF16_2, "=r,r,r,r", [v2, mb], dtype=tl.bfloat16,
                                             is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_BF16_3, "=r,r,r,r", [v2, mb], dtype=tl.bfloat16,
                                             is_pure=True, pack=2)
    else:
        if u == 0:
            return tl.inline_asm_elementwise(_FP16_0, "=r,r,r,r", [v2, mb], dtype=tl.float16,
                                             is_pure=True, pack=2)
        elif u == 1:
            return tl.inline_asm_elementwise(_FP16_1, "=r,r,r,r", [v2, mb], dtype=tl.float16,
                                             is_pure=True, pack=2)
        elif u == 2:
            return tl.inline_asm_elementwise(_FP16_2, "=r,r,r,r", [v2, mb], dtype=tl.float16,
                                             is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_FP16_3, "=r,r,r,r", [v2, mb], dtype=tl.float16,
                                             is_pure=True, pack=2)


@triton.jit
def fp4_tile(w, e, u: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr, BN: tl.constexpr, J: tl.constexpr):
    """Words ``[BN, J/2]`` and the rows' E8M0 exponents ``e [BN]`` (int32) of position ``u``'s block -> the ``[BN, J]``
    tile of element times block scale in ``DT`` (element ``(n, 2p + h)``: the code at bit ``4u + 16 h`` of word
    ``(n, p)``)."""
    v2 = tl.reshape(tl.join(w, w), (BN, J))
    if USE_ASM:
        if DT == tl.bfloat16:
            mult = ((e + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 2^(e - 1)
        else:
            mult = ((e - 98) << 10).to(tl.int16).to(tl.float16, bitcast=True)  # 2^(e - 113)
        return _asm_pairs(v2, tl.broadcast_to(mult[:, None], (BN, J)), u, DT)
    h = tl.arange(0, J) % 2
    code = (v2 >> (4 * u + 16 * h)[None, :]) & 0xF
    scale = (e << 23).to(tl.float32, bitcast=True)  # 2^(e - 127) for e >= 1 (the layout guarantees e >= 2)
    return (elem_fp16(code, 0) * 16384.0 * scale[:, None]).to(DT)


@triton.jit
def nv_tile(w, ptr, nmask, u: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr, BN: tl.constexpr,
            J: tl.constexpr, GROUP: tl.constexpr):
    """NVFP4: words ``[BN, J/2]`` and ``ptr [BN]``, the rows' E4M3 scale of the first of position ``u``'s two blocks
    (``J = 2 GROUP``) -> the ``[BN, J]`` tile of element times ``s_b`` times ``2^-8`` (bf16) or ``2^-7`` (fp16) in
    ``DT``, exact (``s_b``'s 4 significant bits times the element's 2, in range); the kernel multiplies ``2^8 / g``
    (``2^7 / g``) back in fp32 at the end. The two blocks' multipliers are laid along the columns by a join and a
    reshape (like the word pairs), which Triton keeps in the dot operand's registers (a ``tl.where`` on the column
    index made it stage the tile through shared memory)."""
    tl.static_assert(J == 2 * GROUP)
    v2 = tl.reshape(tl.join(w, w), (BN, J))
    if USE_ASM:  # s_b (the E4M3 bits in an fp16, times 256: exact) times 2^118 (bf16) / 2^7 (fp16), one multiply
        MUL: tl.constexpr = 2.0**126 if DT == tl.bfloat16 else 32768.0  # max s_b 2^118 = 2^126.8, s_b 2^7 = 57344
        s0 = elem_fp16(tl.load(ptr, mask=nmask, other=0).to(tl.int32), 1) * MUL
        s1 = elem_fp16(tl.load(ptr + 1, mask=nmask, other=0).to(tl.int32), 1) * MUL
        m2 = tl.join(s0.to(DT), s1.to(DT))  # [BN, 2]
        mt = tl.reshape(tl.broadcast_to(m2[:, :, None], (BN, 2, GROUP)), (BN, J))
        return _asm_pairs(v2, mt, u, DT)  # (element 2^-126) (s_b 2^118) or (element 2^-14) (s_b 2^7)
    s0 = elem_fp16(tl.load(ptr, mask=nmask, other=0).to(tl.int32), 1) * 256.0  # s_b, exact in fp32
    s1 = elem_fp16(tl.load(ptr + 1, mask=nmask, other=0).to(tl.int32), 1) * 256.0
    st = tl.reshape(tl.broadcast_to(tl.join(s0, s1)[:, :, None], (BN, 2, GROUP)), (BN, J))
    h = tl.arange(0, J) % 2
    code = (v2 >> (4 * u + 16 * h)[None, :]) & 0xF
    SH: tl.constexpr = 2.0**-8 if DT == tl.bfloat16 else 2.0**-7
    return (elem_fp16(code, 0) * 16384.0 * st * SH).to(DT)


@triton.jit
def wa_fp4_kernel(
    x_ptr, out_ptr, q_ptr, e_ptr, ws_ptr, cnt_ptr,
    M, N, KW, NB, blocks_per_split, G, stride_xm, stride_om, post,
    GROUP: tl.constexpr, J: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, USE_ASM: tl.constexpr,
    ATOMIC: tl.constexpr, SERIAL: tl.constexpr = False, NV: tl.constexpr = False,
):
    pid_m = tl.program_id(0)  # batch tiles fastest, as in wa_kernel
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    BK: tl.constexpr = 8 * J
    H: tl.constexpr = J // 2
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    wrow = q_ptr + (rn.to(tl.int64) * KW)[:, None] + tl.arange(0, H)[None, :]
    xrow = x_ptr + (rm.to(tl.int64) * stride_xm)[:, None] + tl.arange(0, J)[None, :]
    erow = e_ptr + rn.to(tl.int64) * G
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    for b in range(b_lo, b_hi):
        w_lo = tl.load(wrow + b * J, mask=nmask[:, None], other=0)  # positions 0..3
        w_hi = tl.load(wrow + b * J + H, mask=nmask[:, None], other=0)  # positions 4..7
        xb = xrow + b * BK
        for u in tl.static_range(4):
            if NV:  # J / GROUP blocks a position, E4M3 scales
                lo = nv_tile(w_lo, erow + (b * BK + u * J) // GROUP, nmask, u, DT, USE_ASM, BN, J, GROUP)
                hi = nv_tile(w_hi, erow + (b * BK + (u + 4) * J) // GROUP, nmask, u, DT, USE_ASM, BN, J, GROUP)
            else:  # one E8M0 block (or part of one) a position
                e_lo = tl.load(erow + (b * BK + u * J) // GROUP, mask=nmask, other=127).to(tl.int32)
                e_hi = tl.load(erow + (b * BK + (u + 4) * J) // GROUP, mask=nmask, other=127).to(tl.int32)
                lo = fp4_tile(w_lo, e_lo, u, DT, USE_ASM, BN, J)
                hi = fp4_tile(w_hi, e_hi, u, DT, USE_ASM, BN, J)
            x_lo = tl.trans(tl.load(xb + u * J, mask=mmask[:, None], other=0.0))
            x_hi = tl.trans(tl.load(xb + (u + 4) * J, mask=mmask[:, None], other=0.0))
            acc = tl.dot(lo, x_lo, acc)
            acc = tl.dot(hi, x_hi, acc)
    if NV:  # the tiles' 2^-8 (2^-7) and the per-tensor 1/g; post = 1/g (fp32)
        acc = acc * (post * (256.0 if DT == tl.bfloat16 else 128.0))
    write_tile(acc, out_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, N, stride_om, pid_m, pid_n, ATOMIC, SERIAL)
