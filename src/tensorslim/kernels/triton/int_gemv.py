"""Integer-group GEMV (small batch): ``y = x W^T`` straight from packed codes, for 1..8 activation rows.

Design (FineQuant / FasterTransformer-style weight-only GEMV, with the GPTQ-Triton / split-K tile access): each
program owns ``BN`` output columns and a ``K / SPLIT_K`` slice of the inputs. Per K tile (``BK`` inputs inside one
group) it reads the ``[BK, BN]`` codes from the transposed word layout of :mod:`tensorslim.kernels.layout` (lanes
along N, so reads are coalesced; a word is read once per code it holds and served by L1), unpacks them with shifts and
masks, subtracts the zero point and multiplies by the group scale in fp32 (exactly the reference arithmetic). The
products with the activations accumulate elementwise in a ``[BM, BK, BN]`` fp32 register tile reduced once at the end
(no cross-lane reduction inside the K loop). ``SPLIT_K > 1`` adds partial sums atomically into a zeroed fp32 output
(enough programs for small ``N``). An optional low-rank term ``t U^T`` (``t = x V^T`` computed before the call) is
added by the ``pid_k == 0`` programs, so ``Sum(int, LowRank)`` needs no second pass over ``y``.
The helpers are shared with the tiled GEMM and the dequantize kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(qa_ptr, qb_ptr, offs_k, offs_n, nmask, N, BITS_A: tl.constexpr, BITS_B: tl.constexpr):
    """Codes ``[BK, BN]`` (int32) of inputs ``offs_k`` and outputs ``offs_n`` from the transposed word planes."""
    PA: tl.constexpr = 32 // BITS_A
    ka = (offs_k // PA).to(tl.int64)
    wa = tl.load(qa_ptr + ka[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
    q = (wa >> ((offs_k % PA) * BITS_A)[:, None]) & ((1 << BITS_A) - 1)
    if BITS_B > 0:
        PB: tl.constexpr = 32 // BITS_B
        kb = (offs_k // PB).to(tl.int64)
        wb = tl.load(qb_ptr + kb[:, None] * N + offs_n[None, :], mask=nmask[None, :], other=0)
        q = q | (((wb >> ((offs_k % PB) * BITS_B)[:, None]) & ((1 << BITS_B) - 1)) << BITS_A)
    return q


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
    M, N, K, R, k_split,
    stride_xm, stride_om, stride_tm, stride_un,
    BITS: tl.constexpr, BITS_A: tl.constexpr, BITS_B: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_LR: tl.constexpr, BR: tl.constexpr, SPLIT_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    ms = tl.arange(0, BM)
    mmask = ms < M
    acc = tl.zeros((BM, BK, BN), dtype=tl.float32)
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        offs_k = k0 + tl.arange(0, BK)
        q = load_codes(qa_ptr, qb_ptr, offs_k, offs_n, nmask, N, BITS_A, BITS_B)
        s, z = load_group(s_ptr, z_ptr, k0 // GROUP, offs_n, nmask, N, BITS, SYMMETRIC)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
        x = tl.load(x_ptr + ms[:, None] * stride_xm + offs_k[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
        acc += x[:, :, None] * w[None, :, :]
    y = tl.sum(acc, axis=1)
    if HAS_LR:
        if pid_k == 0:
            rs = tl.arange(0, BR)
            t = tl.load(t_ptr + ms[:, None] * stride_tm + rs[None, :], mask=mmask[:, None] & (rs[None, :] < R),
                        other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs_n[None, :].to(tl.int64) * stride_un + rs[:, None],
                        mask=nmask[None, :] & (rs[:, None] < R), other=0.0).to(tl.float32)
            y += tl.sum(t[:, :, None] * u[None, :, :], axis=1)
    optr = out_ptr + ms[:, None] * stride_om + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(optr, y, mask=omask)
