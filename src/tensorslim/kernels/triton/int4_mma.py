"""int4 tensor-core GEMM (batch 2-128): codes turned into bf16/fp16 by bit tricks, the zero point folded out.

Program ``(m, n, k-split)`` owns a ``BM x BN`` output tile. Per K tile (``BK`` inputs inside one group, ``BK/8 >= 16``)
it loads the ``[BK/8, BN]`` int32 words of the transposed layout (:mod:`tensorslim.kernels.layout`; lanes along N,
coalesced) and turns each word into eight ``[BK/8, BN]`` operands ``B_t`` (``t`` = nibble, input ``k0 + 8j + t``)
holding ``c + q`` exactly in the activation dtype, with no int->float conversion: two nibbles at a time are masked
into the mantissas of a packed pair of ``c`` (bf16 ``c = 128``: ``0x4300``; fp16 ``c = 1024``: ``0x6400``) by one
``lop3`` (inline PTX on the GPU; plain integer ops and a bitcast under the interpreter). Eight ``tl.dot`` s with the
matching strided activation columns ``x[:, k0 + 8j + t]`` accumulate ``sum_k x (c + q)`` in fp32, and
``(that - (c + z) sum_k x) * s`` is the tile's contribution: ``sum_k x (q - z) s`` up to fp32 accumulation
(cancellation of ``c sum x`` costs ~``c/|q-z|`` ulps of fp32, ~1e-6 relative; tests bound 1e-3). ``SPLIT_K > 1``
adds partial sums atomically into a zeroed fp32 output. Optional low-rank epilogue ``t U^T`` as in the other kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .int_gemm import store_tile
from .tiles import tile_rows_cols

_ASM_BF16 = tl.constexpr("""
{
.reg .b32 t1, t2, t3, u0, u1, u2, u3;
lop3.b32 u0, $8, 0x000F000F, 0x43004300, 0xea;
shr.u32 t1, $8, 4;
lop3.b32 u1, t1, 0x000F000F, 0x43004300, 0xea;
shr.u32 t2, $8, 8;
lop3.b32 u2, t2, 0x000F000F, 0x43004300, 0xea;
shr.u32 t3, $8, 12;
lop3.b32 u3, t3, 0x000F000F, 0x43004300, 0xea;
mov.b32 {$0, $4}, u0;
mov.b32 {$1, $5}, u1;
mov.b32 {$2, $6}, u2;
mov.b32 {$3, $7}, u3;
}
""")
_ASM_FP16 = tl.constexpr(_ASM_BF16.value.replace("0x43004300", "0x64006400"))


@triton.jit
def unpack8(w, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words ``[J, BN]`` -> eight ``[J, BN]`` tensors of dtype ``DT`` holding ``c + nibble_t`` exactly."""
    if USE_ASM:
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise(_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.bfloat16,) * 8,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_ASM_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.float16,) * 8,
                                             is_pure=True, pack=1)
    else:
        # via float32: the interpreter's int32 -> bfloat16 cast reinterprets bits (Triton 3.9)
        C: tl.constexpr = 128 if DT == tl.bfloat16 else 1024
        return ((((w & 15) + C).to(tl.float32)).to(DT), ((((w >> 4) & 15) + C).to(tl.float32)).to(DT),
                ((((w >> 8) & 15) + C).to(tl.float32)).to(DT), ((((w >> 12) & 15) + C).to(tl.float32)).to(DT),
                ((((w >> 16) & 15) + C).to(tl.float32)).to(DT), ((((w >> 20) & 15) + C).to(tl.float32)).to(DT),
                ((((w >> 24) & 15) + C).to(tl.float32)).to(DT), ((((w >> 28) & 15) + C).to(tl.float32)).to(DT))


@triton.jit
def int4_mma_kernel(
    x_ptr, out_ptr, q_ptr, s_ptr, z_ptr, t_ptr, u_ptr,
    M, N, K, R, k_split, GROUP, SPLIT_K,
    stride_xm, stride_om, stride_tm, stride_un,
    SYMMETRIC: tl.constexpr, HAS_LR: tl.constexpr, BR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    C: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
    J: tl.constexpr = BK // 8
    ms, mmask, offs_n, nmask = tile_rows_cols(pid_m, pid_n, M, N, BM, BN)
    j = tl.arange(0, J)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        w = tl.load(q_ptr + ((k0 // 8 + j).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :], other=0)
        b0, b1, b2, b3, b4, b5, b6, b7 = unpack8(w, DT, USE_ASM)
        xp = x_ptr + ms[:, None] * stride_xm + (k0 + 8 * j)[None, :]
        x0 = tl.load(xp, mask=mmask[:, None], other=0.0)
        x1 = tl.load(xp + 1, mask=mmask[:, None], other=0.0)
        x2 = tl.load(xp + 2, mask=mmask[:, None], other=0.0)
        x3 = tl.load(xp + 3, mask=mmask[:, None], other=0.0)
        x4 = tl.load(xp + 4, mask=mmask[:, None], other=0.0)
        x5 = tl.load(xp + 5, mask=mmask[:, None], other=0.0)
        x6 = tl.load(xp + 6, mask=mmask[:, None], other=0.0)
        x7 = tl.load(xp + 7, mask=mmask[:, None], other=0.0)
        part = tl.dot(x0, b0)
        part = tl.dot(x1, b1, part)
        part = tl.dot(x2, b2, part)
        part = tl.dot(x3, b3, part)
        part = tl.dot(x4, b4, part)
        part = tl.dot(x5, b5, part)
        part = tl.dot(x6, b6, part)
        part = tl.dot(x7, b7, part)
        sx = tl.sum((x0.to(tl.float32) + x1.to(tl.float32)) + (x2.to(tl.float32) + x3.to(tl.float32))
                    + ((x4.to(tl.float32) + x5.to(tl.float32)) + (x6.to(tl.float32) + x7.to(tl.float32))), axis=1)
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            zc = tl.full((BN,), 8.0 + C, tl.float32)
        else:
            zc = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.float32) + C
        acc += (part - sx[:, None] * zc[None, :]) * s[None, :]
    store_tile(acc, pid_k, t_ptr, u_ptr, out_ptr, ms, offs_n, mmask, nmask, stride_tm, stride_un, stride_om, R,
               HAS_LR, BR, SPLIT_K)
