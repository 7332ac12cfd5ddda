"""Tile bookkeeping shared by the tiled kernels (integer, float, binary-coded, 2:4): output offsets and masks, and
the stores of the float, binary-coded and 2:4 kernels (the integer ones add a low-rank epilogue:
``int_gemm.store_tile``).

``ATOMIC`` kernels run split-K: each program adds its partial sum into a zeroed fp32 output instead of storing it.
The integer kernels (and "wa") can instead reduce serially in a workspace (:func:`serial_add`), which needs neither
the zeroed output nor a cast afterwards.
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


@triton.jit
def serial_add(part, optr, wptr, omask, cnt_ptr):
    """Split-K without a zeroed output: add this split's partial sums ``part`` (fp32) into the workspace at ``wptr``
    (all zeros before the grid's first split arrives), then bump the output tile's arrival counter. The last split to
    arrive reads the sums back, stores them at ``optr`` in the output's dtype, and zeroes its workspace tile and
    counter again, so the workspace is all zeros for the next launch (:func:`tensorslim.kernels.ops.split_scratch`).
    The grid is ``(tiles along M, tiles along N, splits)``; the counter of a tile is at ``pid_m * tiles_n + pid_n``.

    Memory order: the adds are relaxed atomics (performed at L2); a CTA barrier puts every thread's adds before the
    counter's acquire-release increment (release is cumulative), so the last split, after its acquire and a
    barrier, sees every split's adds; it reads them from L2 (``.cg``)."""
    tl.atomic_add(wptr, part, mask=omask, sem="relaxed")
    tl.debug_barrier()
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    if arrived == tl.num_programs(2) - 1:
        tl.debug_barrier()
        total = tl.load(wptr, mask=omask, other=0.0, cache_modifier=".cg")
        tl.store(wptr, tl.zeros_like(part), mask=omask)  # no other program touches this tile again in this grid
        tl.store(optr, total.to(optr.dtype.element_ty), mask=omask)
        tl.store(cnt_ptr + tile, 0)
