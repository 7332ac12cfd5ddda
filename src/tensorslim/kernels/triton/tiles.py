"""Tile bookkeeping shared by the tiled kernels (integer, float, binary-coded, 2:4): output offsets and masks, and
the stores of the float, binary-coded and 2:4 kernels (the integer ones add a low-rank epilogue:
``int_gemm.store_tile``).

``ATOMIC`` kernels run split-K: each program adds its partial sum into a zeroed fp32 output instead of storing it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_rows_cols(pid_m, pid_n, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Row indices (int64) and column indices of a ``[BM, BN]`` output tile, with their masks."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    ms = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    return ms, ms < M, offs_n, offs_n < N


@triton.jit
def store_row(y, out_ptr, m, stride_om, offs_n, nmask, ATOMIC: tl.constexpr):
    """Store (or atomically add) one output row segment ``y [BN]`` of row ``m``."""
    optr = out_ptr + m.to(tl.int64) * stride_om + offs_n
    if not ATOMIC:
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(optr, y, mask=nmask)


@triton.jit
def store_rows(acc, out_ptr, ms, stride_om, offs_n, mmask, nmask, ATOMIC: tl.constexpr):
    """Store (or atomically add) the ``[BM, BN]`` tile ``acc`` at rows ``ms`` and columns ``offs_n``."""
    optr = out_ptr + ms[:, None] * stride_om + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if not ATOMIC:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(optr, acc, mask=omask)
