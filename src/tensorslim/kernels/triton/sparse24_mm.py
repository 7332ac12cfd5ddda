"""2:4 sparse + int4: "load as sparse, compute as dense" (in the spirit of Flash-LLM, Xia et al., arXiv 2309.10285).

Every run of 4 inputs of a row keeps 2 weights; the kept values form a compact ``[N, K/2]`` int4 matrix (groups of
``GROUP/2`` compact values = ``GROUP`` original inputs). The kernels read only the compact codes (int4 words
``[K/16, N]``), their scales / zero points and the 2-bit positions (``idx [K/32, N]``: a nibble ``i0 | i1 << 2`` per
run of 4, :mod:`..layout_ext`): 4 + 1 bits a kept weight plus the scales, ~2.6 bits a dense weight at g128.

Per K tile of ``BK`` original inputs (inside one group), for the ``BK/4`` runs: ``v0, v1`` = the run's two compact
codes (word ``r // 4``, bits ``8 (r % 4)`` and ``+4``), ``i0, i1`` its positions.
- GEMV (1-16 rows, one row a program): "compute as sparse": gather the two activations ``x[k0 + 4r + i0]``,
  ``x[k0 + 4r + i1]`` (cached loads of the row's tile) and FMA with the integer weights; the zero point comes out as
  ``z (x0 + x1)``; the group scale multiplies the tile. Half the multiply-adds of the dense product.
- GEMM (tensor cores): expand to the dense ``[BK, BN]`` tile in registers (``where(i0 == p, v0 - z, 0) + where(i1 ==
  p, v1 - z, 0)`` for the 4 positions ``p``; integers, exact in bf16/fp16), one ``tl.dot`` with fp32 accumulation,
  times the group scale. The sparse tensor cores (``mma.sp``) are not reachable from Triton, so the MMA work is that
  of a dense GEMM; the saving is the weight traffic.
``ATOMIC`` (split-K: ``k_split < K``) adds partial sums atomically into a
zeroed fp32 output; the split factor itself is a runtime argument, so it costs no extra compile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import store_row, store_rows, tile_rows_cols


@triton.jit
def load_runs(qa_ptr, idx_ptr, s_ptr, z_ptr, k0, offs_n, nmask, N, GROUP,
              SYMMETRIC: tl.constexpr, BK: tl.constexpr):
    """``(v0 - z, v1 - z, i0, i1)`` as ``[BK/4, BN]`` (fp32 weights, int32 positions) and the ``[BN]`` group scale."""
    r = k0 // 4 + tl.arange(0, BK // 4)  # absolute run index
    nib = tl.load(idx_ptr + ((r // 8).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :], other=0)
    nib = (nib >> ((r % 8) * 4)[:, None]) & 0xF
    w = tl.load(qa_ptr + ((r // 4).to(tl.int64) * N)[:, None] + offs_n[None, :], mask=nmask[None, :], other=0)
    sh = ((r % 4) * 8)[:, None]
    g = k0 // GROUP
    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = tl.full(s.shape, 8, tl.int32)
    else:
        z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0).to(tl.int32)
    v0 = (((w >> sh) & 0xF) - z[None, :]).to(tl.float32)
    v1 = (((w >> (sh + 4)) & 0xF) - z[None, :]).to(tl.float32)
    return v0, v1, nib & 3, nib >> 2, s


@triton.jit
def sparse24_gemv_kernel(
    x_ptr, out_ptr, qa_ptr, idx_ptr, s_ptr, z_ptr,
    M, N, K, k_split, GROUP,
    stride_xm, stride_om,
    SYMMETRIC: tl.constexpr, ATOMIC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    ra = tl.arange(0, BK // 4)
    acc = tl.zeros((BK // 4, BN), dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        v0, v1, i0, i1, s = load_runs(qa_ptr, idx_ptr, s_ptr, z_ptr, k0, offs_n, nmask, N, GROUP, SYMMETRIC, BK)
        xb = x_row + (k0 + ra * 4)[:, None]
        x0 = tl.load(xb + i0).to(tl.float32)
        x1 = tl.load(xb + i1).to(tl.float32)
        acc += (x0 * v0 + x1 * v1) * s[None, :]
    y = tl.sum(acc, axis=0)
    store_row(y, out_ptr, m, stride_om, offs_n, nmask, ATOMIC)


@triton.jit
def sparse24_gemm_kernel(
    x_ptr, out_ptr, qa_ptr, idx_ptr, s_ptr, z_ptr,
    M, N, K, k_split, GROUP,
    stride_xm, stride_om,
    SYMMETRIC: tl.constexpr, ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    ms, mmask, offs_n, nmask = tile_rows_cols(pid_m, pid_n, M, N, BM, BN)
    koff = tl.arange(0, BK)
    p = tl.arange(0, 4)[None, :, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + ms[:, None] * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        v0, v1, i0, i1, s = load_runs(qa_ptr, idx_ptr, s_ptr, z_ptr, k0, offs_n, nmask, N, GROUP, SYMMETRIC, BK)
        dense = tl.where(i0[:, None, :] == p, v0[:, None, :], 0.0) + tl.where(i1[:, None, :] == p, v1[:, None, :], 0.0)
        w = tl.reshape(dense, (BK, BN)).to(x_ptr.dtype.element_ty)  # [BK/4, 4, BN] -> input 4r + p
        x = tl.load(x_rows + (k0 + koff)[None, :], mask=mmask[:, None], other=0.0)
        acc += tl.dot(x, w) * s[None, :]
    store_rows(acc, out_ptr, ms, stride_om, offs_n, mmask, nmask, ATOMIC)
