"""Integer-group tiled GEMM (batch >= 2) and the dequantize kernel behind "dequantize once, then cuBLAS".

Tiled GEMM: program ``(m, n, k-split)`` owns a ``BM x BN`` output tile; per K tile (inside one group, ``BK |
GROUP``) it unpacks the ``[BK, BN]`` codes (transposed word layout, coalesced along N), forms the *integer* weights
``q - z`` in the activation dtype (exact in bf16/fp16 for up to 8 bits: ``|q - z| <= 255``), runs one tensor-core
``tl.dot`` with fp32 accumulation and scales the partial product by the group scales in fp32. So the only rounding
is the fp32 accumulation: the result matches ``x @ decode()^T`` in fp32 to accumulation-order error. ``SPLIT_K > 1``
adds partial sums atomically into a zeroed fp32 output (for few output tiles). ``PLANES`` ("gemmp", single-plane
codes only) multiplies per code position instead: ``32 / BITS_A`` dots of ``K = BK * BITS_A / 32 >= 16`` against
the activations of inputs ``j * PA + t`` (strided loads), so the unpacked codes are never reshaped; same numerics.
The ``m`` index varies fastest over the grid, so programs sharing a weight tile run together and read it from L2.
An optional low-rank epilogue adds ``t U^T`` (fp32, ``pid_k == 0`` only).

Dequantize: writes the dense ``W^T [K, N]`` in the activation dtype (bf16 rounding of the weights, as a bf16 model
has), for large batches where cuBLAS on the dense matrix beats the fused kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .int_gemv import load_codes3, load_group, tile_k_offsets
from .tiles import tile_rows_cols


@triton.jit
def store_tile(acc, pid_k, t_ptr, u_ptr, out_ptr, ms, offs_n, mmask, nmask, stride_tm, stride_un, stride_om, R,
               HAS_LR: tl.constexpr, BR: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue shared by the tiled GEMM kernels: add the low-rank term ``(x V^T) U^T`` once (split 0), then store
    (or atomically add, under split-K) the ``[BM, BN]`` tile."""
    if HAS_LR:
        if pid_k == 0:
            rs = tl.arange(0, BR)
            t = tl.load(t_ptr + ms[:, None] * stride_tm + rs[None, :], mask=mmask[:, None] & (rs[None, :] < R),
                        other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs_n[None, :].to(tl.int64) * stride_un + rs[:, None],
                        mask=nmask[None, :] & (rs[:, None] < R), other=0.0).to(tl.float32)
            acc += tl.dot(t, u, input_precision="ieee")
    optr = out_ptr + ms[:, None] * stride_om + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(optr, acc, mask=omask)


@triton.jit
def int_gemm_kernel(
    x_ptr, out_ptr, qa_ptr, qb_ptr, s_ptr, z_ptr, t_ptr, u_ptr,
    M, N, K, R, k_split, GROUP, SPLIT_K,
    stride_xm, stride_om, stride_tm, stride_un,
    BITS: tl.constexpr, BITS_A: tl.constexpr, BITS_B: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_LR: tl.constexpr, BR: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PLANES: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    ms, mmask, offs_n, nmask = tile_rows_cols(pid_m, pid_n, M, N, BM, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    koff = tl.arange(0, BK)  # load_codes3 flattened is the natural input order
    x_rows = x_ptr + ms[:, None] * stride_xm
    k_lo = pid_k * k_split
    for k0 in range(k_lo, k_lo + k_split, BK):
        s, z = load_group(s_ptr, z_ptr, k0 // GROUP, offs_n, nmask, N, BITS, SYMMETRIC)
        if PLANES:  # one dot per code position t of the words: inputs j*PA + t, no [BK, BN] reshape
            PA: tl.constexpr = 32 // BITS_A
            ja = tl.arange(0, BK // PA)
            wa = tl.load(qa_ptr + ((k0 // PA + ja).to(tl.int64) * N)[:, None] + offs_n[None, :],
                         mask=nmask[None, :], other=0)
            part = tl.zeros((BM, BN), dtype=tl.float32)
            for t in tl.static_range(PA):
                w = (((wa >> (t * BITS_A)) & ((1 << BITS_A) - 1)) - z[None, :]).to(x_ptr.dtype.element_ty)
                x = tl.load(x_rows + (k0 + ja * PA + t)[None, :], mask=mmask[:, None], other=0.0)
                part = tl.dot(x, w, part)
            acc += part * s[None, :]
        else:
            q = tl.reshape(load_codes3(qa_ptr, qb_ptr, k0, offs_n, nmask, N, BITS_A, BITS_B, BK), (BK, BN))
            x = tl.load(x_rows + (k0 + koff)[None, :], mask=mmask[:, None], other=0.0)
            w = (q - z[None, :]).to(x_ptr.dtype.element_ty)  # [BK, BN], integers: exact in fp16/bf16
            acc += tl.dot(x, w) * s[None, :]
    store_tile(acc, pid_k, t_ptr, u_ptr, out_ptr, ms, offs_n, mmask, nmask, stride_tm, stride_un, stride_om, R,
               HAS_LR, BR, SPLIT_K)


@triton.jit
def int_dequant_kernel(
    out_ptr, qa_ptr, qb_ptr, s_ptr, z_ptr, N, GROUP,
    BITS: tl.constexpr, BITS_A: tl.constexpr, BITS_B: tl.constexpr, SYMMETRIC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    """Write ``W^T`` (``[K, N]``, row stride ``N``: coalesced stores) in the output dtype."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    k0 = pid_k * BK
    q = load_codes3(qa_ptr, qb_ptr, k0, offs_n, nmask, N, BITS_A, BITS_B, BK)
    s, z = load_group(s_ptr, z_ptr, k0 // GROUP, offs_n, nmask, N, BITS, SYMMETRIC)
    w = (q - z[None, None, :]).to(tl.float32) * s[None, None, :]
    koff = (k0 + tile_k_offsets(BITS_A, BK)).to(tl.int64)
    tl.store(out_ptr + koff[:, :, None] * N + offs_n[None, None, :], w.to(out_ptr.dtype.element_ty),
             mask=nmask[None, None, :])
