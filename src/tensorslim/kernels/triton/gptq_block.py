"""Fused GPTQ inner loop: quantize a run of columns of one block and propagate each column's error in-kernel.

The OBS loop (:mod:`tensorslim.methods.obs`) spends nearly all of its GPU time launching ~10 tiny kernels per column.
Output rows are independent given ``U`` (the upper Cholesky factor of ``H^{-1}``), so one program here holds a
``[K, R]`` tile of the block (``K`` = block columns in solve order, ``R`` output rows) in registers and, for columns
``i0 <= i < i1``: projects column ``i`` onto its grid (``c = clamp(round(x / s) + z, 0, maxq)``, ``q = (c - z) s``,
``round`` = half to even as ``torch.round``), records ``q``, ``c`` and the scaled error ``e = (x - q) / U_ii``, and
applies ``x_j -= U_ij e`` to the tile's later columns ``j > i``. The caller applies the block's lazy GEMM update to the
rest of the matrix. Same arithmetic as the reference loop up to the order of floating-point operations (per-column
rank-1 updates here vs sub-block GEMMs there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gptq_columns(B, U, S, Z, Q, C, E, n_rows, k, i0, i1, maxq, K: tl.constexpr, R: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    ks = tl.arange(0, K)
    rmask = rows < n_rows
    kmask = ks < k
    offs = ks[:, None] * n_rows + rows[None, :]
    m2 = kmask[:, None] & rmask[None, :]
    tile = tl.load(B + offs, mask=m2, other=0.0)
    for i in range(i0, i1):
        x = tl.sum(tl.where(ks[:, None] == i, tile, 0.0), axis=0)
        s = tl.load(S + i * n_rows + rows, mask=rmask, other=1.0)
        z = tl.load(Z + i * n_rows + rows, mask=rmask, other=0.0)
        v = x / s
        r = tl.floor(v + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)  # ties to even, like torch.round
        c = tl.minimum(tl.maximum(r + z, 0.0), maxq)
        q = (c - z) * s
        d = tl.load(U + i * k + i)
        e = (x - q) / d
        tl.store(Q + i * n_rows + rows, q, mask=rmask)
        tl.store(C + i * n_rows + rows, c, mask=rmask)
        tl.store(E + i * n_rows + rows, e, mask=rmask)
        urow = tl.load(U + i * k + ks, mask=kmask & (ks > i), other=0.0)
        tile = tile - urow[:, None] * e[None, :]
    tl.store(B + offs, tile, mask=m2)


def gptq_columns(b: torch.Tensor, u1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q: torch.Tensor,
                 codes: torch.Tensor, err: torch.Tensor, i0: int, i1: int, maxq: int) -> None:
    """Process columns ``i0..i1-1`` of the block ``b [k, rows]`` (one row per column, updated in place).

    ``u1 [k, k]``: the block of ``U``; ``scale``/``zero [k, rows]``: each column's grid; results go to rows ``i0..i1-1``
    of ``q``, ``codes`` and ``err`` (all ``[k, rows]`` float32, contiguous).
    """
    k, n = b.shape
    for t in (b, u1, scale, zero, q, codes, err):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("gptq_columns needs contiguous float32 tensors")
    kp = triton.next_power_of_2(k)
    rows = 32 if kp <= 128 else 16
    _gptq_columns[(triton.cdiv(n, rows),)](b, u1, scale, zero, q, codes, err, n, k, i0, i1, float(maxq),
                                           K=kp, R=rows, num_warps=4)
