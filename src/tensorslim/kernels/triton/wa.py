"""int4 / int3 / int2 tensor-core GEMM with the *weights as the A operand* ("wa"; any batch; power-of-two groups >=
32).

The other tiled kernels compute ``y[BM, BN] = x[BM, BK] @ W^T[BK, BN]``: the weights are the B operand, which the
tensor cores read from shared memory, so every dequantized weight tile makes a round trip through shared memory,
and with few rows (decode) the ``M`` side of the instruction is mostly padding. Here the product is swapped:
``y^T[BN, BM] = W[BN, BK] @ x^T[BK, BM]``. The weights are the A operand, which both ``mma.sync`` and Hopper's
``wgmma`` take from registers, so the codes go from global memory to registers to the tensor cores; output features
fill the instruction's ``M`` side (64 per warpgroup for ``wgmma``; Triton uses ``mma.sync`` for ``BN = 32`` or 2 warps)
and the batch its small ``N`` side (``BM`` >= 8).

Layout (:func:`tensorslim.kernels.layout.wa_layout`, a one-time repack): ``q[N, K/8]`` int32, rows are output
features, ``J`` words per row per block of ``8 J`` inputs. Code position ``t = 4 h + u`` of a block covers inputs
``J t .. J t + J - 1``; the pair of inputs ``J t + 2p, J t + 2p + 1`` sits at bits ``4u`` and ``4u + 16`` of word ``h
J/2 + p``. So per block two ``[BN, J/2]`` word tiles (``h`` = 0, 1), and per ``u`` one shift and one ``lop3`` per
word give the ``[BN, J]`` weight tiles of positions ``u`` and ``u + 4`` with each adjacent-input pair already in one
register, which is how the dot operand holds it: eight ``tl.dot`` s with K = J per block, each against a contiguous
slice of the activations, and no reshuffling of the unpacked codes. ``J = 64`` measured best at 1-16 rows on the
H200 and H100 (session 5, ``bench/wa_sweep.py``); ``J = 32`` where 512-input blocks do not fit.

int2 and ternary (``BITS = 2``): one ``[BN, J/2]`` word tile a block holds all eight positions, input ``J t + 2p +
e`` at bit ``2t + 16e`` of word ``p``; the same shift-and-``lop3`` (mask ``0x00030003``) makes the pairs. int3
(``BITS = 3``, session 6): the block's low 2 bits as int2, then ``J/4`` words of high bits (input ``J t + 2p + e`` at
bit ``t + 8 (p % 2) + 16 e`` of word ``p // 2``), widened once a block to ``[BN, J/2]`` (:func:`pair_tile3`).
Measured on the H100 in session 6 (docs/results/kernels.md).

Arithmetic: the ``lop3`` ORs the nibble pair into the mantissas of bf16 ``c = 128`` (fp16 ``c = 1024``), giving ``c +
q`` exactly; ``- (c + z)`` in the activation dtype (one packed subtraction per pair) gives ``q - z`` exactly; the
dots accumulate ``sum_k x (q - z)`` in fp32 per group and the group scale multiplies that in fp32. So the result is
``x @ decode()^T`` up to fp32 accumulation order (measured ~1e-7 relative). Two dot chains per block (positions
``u`` and ``u + 4``) keep two unpacked tiles live (Triton 3.6: 104-136 registers a thread for the decode configs).
``ATOMIC``: split-K (``ceil(NB / SPLIT_K)`` blocks a split, so any block count splits: Llama-2's 11008 inputs
are 43 blocks of 256), partial sums added atomically into a zeroed fp32 output; with ``SERIAL`` into a zeroed fp32
workspace instead, and the last split of each output tile to arrive (a per-tile counter) reads the sums back while
zeroing them, writes the output in its own dtype and resets the counter, so no fill before the call and no
conversion after it (two kernels fewer) and the workspace is zero again for the next call
(:func:`tensorslim.kernels.ops.split_scratch`). ``HAS_LR``: the fused ``Sum(int4,
LowRank)`` epilogue, ``U t^T`` with ``t = x V^T`` computed before the call as ``TC`` K-chunk partial sums
(:mod:`.lowrank_t`), added up here. ``PDL``: this grid was launched while ``lowrank_t`` still runs (programmatic
dependent launch, Hopper+); the epilogue waits for it (``gdc_wait``) just before reading ``t``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from .gdc import gdc_wait

_LOP4_BF16 = tl.constexpr("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;")
_LOP4_FP16 = tl.constexpr("lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xea;")
_LOP2_BF16 = tl.constexpr("lop3.b32 $0, $1, 0x00030003, 0x43004300, 0xea;")
_LOP2_FP16 = tl.constexpr("lop3.b32 $0, $1, 0x00030003, 0x64006400, 0xea;")
_LOP3_BF16 = tl.constexpr("lop3.b32 $0, $1, 0x00070007, 0x43004300, 0xea;")
_LOP3_FP16 = tl.constexpr("lop3.b32 $0, $1, 0x00070007, 0x64006400, 0xea;")
_LOP1_BF16 = tl.constexpr("lop3.b32 $0, $1, 0x00010001, 0x43004300, 0xea;")
_LOP1_FP16 = tl.constexpr("lop3.b32 $0, $1, 0x00010001, 0x64006400, 0xea;")


@triton.jit
def _code_pairs(v2, BITS: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr, J: tl.constexpr):
    """``[BN, J]`` words (each twice: elements ``2p``, ``2p + 1`` are word ``p``) whose bits ``0..BITS-1`` and
    ``16..16+BITS-1`` hold a code pair -> ``c + q`` in ``DT``. On the GPU one ``lop3`` per word makes the pair in one
    register (``pack=2``), which is already the dot operand's register."""
    if USE_ASM:
        if BITS == 4:
            if DT == tl.bfloat16:
                return tl.inline_asm_elementwise(_LOP4_BF16, "=r,r,r", [v2], dtype=tl.bfloat16, is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(_LOP4_FP16, "=r,r,r", [v2], dtype=tl.float16, is_pure=True, pack=2)
        elif BITS == 3:
            if DT == tl.bfloat16:
                return tl.inline_asm_elementwise(_LOP3_BF16, "=r,r,r", [v2], dtype=tl.bfloat16, is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(_LOP3_FP16, "=r,r,r", [v2], dtype=tl.float16, is_pure=True, pack=2)
        elif BITS == 2:
            if DT == tl.bfloat16:
                return tl.inline_asm_elementwise(_LOP2_BF16, "=r,r,r", [v2], dtype=tl.bfloat16, is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(_LOP2_FP16, "=r,r,r", [v2], dtype=tl.float16, is_pure=True, pack=2)
        else:  # 1-bit planes (BCQ, :mod:`.wa_bcq`)
            if DT == tl.bfloat16:
                return tl.inline_asm_elementwise(_LOP1_BF16, "=r,r,r", [v2], dtype=tl.bfloat16, is_pure=True, pack=2)
            else:
                return tl.inline_asm_elementwise(_LOP1_FP16, "=r,r,r", [v2], dtype=tl.float16, is_pure=True, pack=2)
    else:  # via float32: the interpreter's int32 -> bfloat16 cast reinterprets bits (Triton 3.9)
        C: tl.constexpr = 128 if DT == tl.bfloat16 else 1024
        e = tl.arange(0, J) % 2
        return (((v2 >> (16 * e)[None, :]) & ((1 << BITS) - 1)) + C).to(tl.float32).to(DT)


@triton.jit
def pair_tile(w, u: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr, BN: tl.constexpr, J: tl.constexpr,
              BITS: tl.constexpr = 4):
    """Words ``[BN, J/2]`` -> the ``[BN, J]`` tile ``c + q`` of code position ``u`` in ``DT``: element ``(n, 2p + e)``
    is the ``BITS``-bit code at bit ``BITS u + 16 e`` of word ``(n, p)``."""
    v = w >> (BITS * u)
    return _code_pairs(tl.reshape(tl.join(v, v), (BN, J)), BITS, DT, USE_ASM, J)


@triton.jit
def pair_tile3(w2, wh, t: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr, BN: tl.constexpr,
               J: tl.constexpr):
    """int3, position ``t`` (0..7): low-plane words ``[BN, J/2]`` (pair bits ``2t``, ``2t + 16``) and high-plane words
    ``wh [BN, J/2]`` already shifted per column by ``8 (p % 2)`` (pair bits ``t``, ``t + 16``) -> ``c + q``."""
    lo = (w2 >> (2 * t)) & 0x00030003
    if t >= 2:
        hi = (wh >> (t - 2)) & 0x00040004
    else:
        hi = (wh << (2 - t)) & 0x00040004
    v = lo | hi
    return _code_pairs(tl.reshape(tl.join(v, v), (BN, J)), 3, DT, USE_ASM, J)


@triton.jit
def load_group_rows(srow, zrow, g, nmask, DT: tl.constexpr, C: tl.constexpr, SYMMETRIC: tl.constexpr,
                    BITS: tl.constexpr = 4):
    """Scale (fp32) and ``c + z`` (in ``DT``, exact) ``[BN]`` of group ``g`` for rows whose group vectors start at
    ``srow`` / ``zrow``."""
    s = tl.load(srow + g, mask=nmask, other=1.0).to(tl.float32)
    if SYMMETRIC:
        zc = tl.full(s.shape, (1 << (BITS - 1)) + C, tl.float32)
    else:
        zc = tl.load(zrow + g, mask=nmask, other=0).to(tl.float32) + C
    return s, zc.to(DT)


@triton.jit
def wa_kernel(
    x_ptr, out_ptr, q_ptr, s_ptr, z_ptr, t_ptr, u_ptr, ws_ptr, cnt_ptr,
    M, N, KW, NB, blocks_per_split, G, R, TC,
    stride_xm, stride_om, stride_tc, stride_tm, stride_un,
    SYMMETRIC: tl.constexpr, GROUP: tl.constexpr, J: tl.constexpr, HAS_LR: tl.constexpr, BR: tl.constexpr,
    TCP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, USE_ASM: tl.constexpr, ATOMIC: tl.constexpr, BITS: tl.constexpr = 4,
    HALF: tl.constexpr = False, PDL: tl.constexpr = False, SERIAL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)  # batch tiles fastest: the programs sharing a weight tile run together (one DRAM read)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    C: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
    BK: tl.constexpr = 8 * J  # inputs per block
    SEG: tl.constexpr = GROUP // J if GROUP < BK else 8  # code positions per group within a block (1, 2, 4 or 8)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    H: tl.constexpr = J // 2
    jh = tl.arange(0, H)
    jj = tl.arange(0, J)
    wrow = q_ptr + (rn.to(tl.int64) * KW)[:, None] + jh[None, :]  # [BN, J/2] words of block 0, positions 0..3
    hrow = q_ptr + (rn.to(tl.int64) * KW)[:, None] + tl.arange(0, J // 4)[None, :]  # int3: [BN, J/4] high words
    xrow = x_ptr + (rm.to(tl.int64) * stride_xm)[:, None] + jj[None, :]  # [BM, J] activations, inputs 0..J-1
    srow = s_ptr + rn.to(tl.int64) * G
    zrow = z_ptr + rn.to(tl.int64) * G
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)  # the last split may hold fewer blocks
    if HALF:  # int4, one half-block (one word tile, positions 0..3 or 4..7, 4 J inputs) an iteration: half the
        # shared memory a pipeline stage and one live word tile, for large BM / BN. One accumulator, kept in units of
        # the current group's scale: at each group change it is multiplied by s_prev / s_new (fp32, exact when the
        # group repeats), and by the last scale at the end; so no second [BN, BM] register tile for a group's partial
        # sum. The layout has no zero scales (wa_layout makes such groups' codes equal their zero point, scale 1).
        SEGH: tl.constexpr = GROUP // J if GROUP < 4 * J else 4  # positions a group within a half-block
        s_acc = tl.full((BN,), 1.0, tl.float32)  # the scale whose units acc is in
        for hb in range(2 * b_lo, 2 * b_hi):
            w = tl.load(wrow + hb * H, mask=nmask[:, None], other=0)
            xh = xrow + hb * (4 * J)
            for u in tl.static_range(4):
                if u % SEGH == 0:
                    s_h, z_h = load_group_rows(srow, zrow, (hb * 4 * J + u * J) // GROUP, nmask, DT, C, SYMMETRIC,
                                               BITS)
                    acc = acc * (s_acc / s_h)[:, None]
                    s_acc = s_h
                a = pair_tile(w, u, DT, USE_ASM, BN, J, BITS) - z_h[:, None]
                xs = tl.trans(tl.load(xh + u * J, mask=mmask[:, None], other=0.0))
                acc = tl.dot(a, xs, acc)
        acc = acc * s_acc[:, None]
    else:
        for b in range(b_lo, b_hi):
            WPB: tl.constexpr = J * BITS // 4  # words a row per block (int3: J/2 low-plane words, then J/4 high)
            w_lo = tl.load(wrow + b * WPB, mask=nmask[:, None], other=0)  # int4: positions 0..3; int2: all eight
            if BITS == 4:
                w_hi = tl.load(wrow + b * WPB + H, mask=nmask[:, None], other=0)  # positions 4..7
            if BITS == 3:  # the high-bit words after the block's low-plane words, [BN, J/4] -> [BN, J/2]
                wq = tl.load(hrow + b * WPB + H, mask=nmask[:, None], other=0)
                wh = tl.reshape(tl.join(wq, wq >> 8), (BN, H))  # column 2p' + h: word p' >> 8 h
            xb = xrow + b * BK
            # two dot chains (positions u and u + 4), one when the whole block is one group
            for u in tl.static_range(4):
                if u % SEG == 0:
                    s_lo, z_lo = load_group_rows(srow, zrow, (b * BK + u * J) // GROUP, nmask, DT, C, SYMMETRIC,
                                                   BITS)
                    if SEG < 8:
                        s_hi, z_hi = load_group_rows(srow, zrow, (b * BK + (u + 4) * J) // GROUP, nmask, DT, C,
                                                     SYMMETRIC, BITS)
                    else:
                        s_hi, z_hi = s_lo, z_lo
                if BITS == 3:
                    lo = pair_tile3(w_lo, wh, u, DT, USE_ASM, BN, J) - z_lo[:, None]
                    hi = pair_tile3(w_lo, wh, u + 4, DT, USE_ASM, BN, J) - z_hi[:, None]
                else:
                    lo = pair_tile(w_lo, u, DT, USE_ASM, BN, J, BITS) - z_lo[:, None]  # (c + q) - (c + z) = q - z
                    if BITS == 4:
                        hi = pair_tile(w_hi, u, DT, USE_ASM, BN, J, BITS) - z_hi[:, None]
                    else:
                        hi = pair_tile(w_lo, u + 4, DT, USE_ASM, BN, J, BITS) - z_hi[:, None]
                x_lo = tl.trans(tl.load(xb + u * J, mask=mmask[:, None], other=0.0))  # [J, BM]: rows contiguous in x
                x_hi = tl.trans(tl.load(xb + (u + 4) * J, mask=mmask[:, None], other=0.0))
                if SEG == 8:
                    if u == 0:
                        part = tl.dot(lo, x_lo)
                    else:
                        part = tl.dot(lo, x_lo, part)
                    part = tl.dot(hi, x_hi, part)
                    if u == 3:
                        acc += part * s_lo[:, None]
                else:
                    if u % SEG == 0:
                        p_lo = tl.dot(lo, x_lo)
                        p_hi = tl.dot(hi, x_hi)
                    else:
                        p_lo = tl.dot(lo, x_lo, p_lo)
                        p_hi = tl.dot(hi, x_hi, p_hi)
                    if u % SEG == SEG - 1:
                        acc += p_lo * s_lo[:, None] + p_hi * s_hi[:, None]
    if HAS_LR:  # low-rank term (t U^T)^T = U t^T, once (split 0), fp32
        if pid_k == 0:
            if PDL:  # t comes from the grid launched just before this one, which may still be running
                gdc_wait()
            rs = tl.arange(0, BR)
            u = tl.load(u_ptr + (rn.to(tl.int64) * stride_un)[:, None] + rs[None, :],
                        mask=nmask[:, None] & (rs[None, :] < R), other=0.0).to(tl.float32)
            # the TC K-chunk partial sums of t (ops.lowrank_t) in one [TCP, BR, BM] load, then their sum (a loop of
            # TC dependent loads at the end of every program cost ~25 us on 8192x28672, H100)
            cs = tl.arange(0, TCP)
            tptr = t_ptr + (cs * stride_tc)[:, None, None] + (rm.to(tl.int64) * stride_tm)[None, None, :] \
                + rs[None, :, None]
            tmask = (cs < TC)[:, None, None] & mmask[None, None, :] & (rs < R)[None, :, None]
            t = tl.sum(tl.load(tptr, mask=tmask, other=0.0).to(tl.float32), axis=0)
            acc += tl.dot(u, t, input_precision="ieee")
    write_tile(acc, out_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, N, stride_om, pid_m, pid_n, ATOMIC, SERIAL)


@triton.jit
def write_tile(acc, out_ptr, ws_ptr, cnt_ptr, rm, rn, mmask, nmask, N, stride_om, pid_m, pid_n,
               ATOMIC: tl.constexpr, SERIAL: tl.constexpr):
    """Store the ``[BN, BM]`` fp32 tile ``acc`` (``y^T``) of outputs ``rn`` x rows ``rm``: plainly, atomically into a
    zeroed fp32 output (split-K), or (``SERIAL``) through the zeroed fp32 workspace ``ws_ptr`` and the per-tile
    counters ``cnt_ptr``, the tile's last split writing the output in its dtype and re-zeroing both."""
    optr = out_ptr + (rm.to(tl.int64) * stride_om)[None, :] + rn[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if ATOMIC and SERIAL:  # split-K into a zeroed fp32 workspace; the tile's last split writes out and re-zeroes it
        wptr = ws_ptr + (rm.to(tl.int64) * N)[None, :] + rn[:, None]
        tl.atomic_add(wptr, acc, mask=omask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds precede the release below (cumulative)
        tile = pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == tl.num_programs(2) - 1:  # every other split's adds are visible (acquire)
            tl.debug_barrier()
            total = tl.load(wptr, mask=omask, other=0.0, cache_modifier=".cg")  # from L2, where the adds are
            # every thread has its sums before any thread zeroes: the compiler may give the load and the store
            # different thread-to-element layouts (it did for 16-bit outputs with 2+ rows: 2-40% wrong, session 11)
            tl.debug_barrier()
            tl.store(wptr, tl.zeros_like(acc), mask=omask)  # no other program touches this tile again in this grid
            tl.store(optr, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(cnt_ptr + tile, 0)
    elif ATOMIC:
        tl.atomic_add(optr, acc, mask=omask)
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)
