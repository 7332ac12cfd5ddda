"""A hand-pipelined prototype of the int4 "wa" kernel in Triton's Gluon dialect (GPU only; not used by the
dispatcher).

    python bench/gluon_wa.py [--cases 8192x28672:1:64:32:2:3:1,...] [--compile-only]

Why: the shipped "wa" kernel (:mod:`tensorslim.kernels.triton.wa`) leaves its memory pipeline to Triton's pipeliner,
which issues each block's ``cp.async`` only after the iteration's last activation-tile read (docs/results/kernels.md,
sessions 8-9). Here the pipeline is written out: a ring of ``S`` shared-memory stages, and every iteration *first*
issues the copies of block ``b + S - 1``, then waits for block ``b`` and computes on it.

Same layout and arithmetic as "wa" (int4, asymmetric or symmetric groups of ``2 J`` inputs with ``J = 64``, i.e.
group 128; :func:`tensorslim.kernels.layout.wa_layout`), ``mma.sync`` m16n8k16 with the weights as the A operand:
- the word tile ``[BN, J/2]`` of one half-block is read from shared memory in the layout of a 32-bit dot operand
  (``k_width = 1``), where each word sits in the thread and register that hold the bf16 pair it encodes in the
  16-bit A operand (``k_width = 2``); ``join`` + ``reshape`` + one ``lop3`` a word then give that operand with no
  data movement (checked at compile time: ``convert_layout(..., assert_trivial=True)``);
- the activation tile is read transposed from shared memory as the B operand;
- both shared tiles are swizzled so that these reads are free of bank conflicts.

Gluon has no interpreter mode, so this kernel cannot run in CI; ``--compile-only`` builds it for sm_90 without a GPU
(with the device image's Triton 3.6 on ``PYTHONPATH``). On the GPU it is checked against ``x @ decode()^T`` in fp32
and timed next to the shipped kernel's config and cuBLAS bf16, like ``bench/wa_probe.py``. Writes
``$OUT/gluon_wa.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, "src")
sys.path.insert(0, "bench")

import torch  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2  # noqa: E402

# Triton 3.6 (the device image) and later versions name two of the builtins differently.
# cp.async global -> shared: ``async_copy_global_to_shared`` in 3.6, ``async_load`` later
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# a CTA-wide barrier: ``thread_barrier`` in Triton 3.6, ``barrier`` later
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

# shape in x out : batch : J : BN : warps : stages : split [: bits [: half [: rank]]]; BM = 8 for batch <= 8, else 16;
# half: int4 pipeline stages of half a block (4 code positions, half the shared memory a stage); rank: the Sum with a
# low-rank term of that rank, its t = x V^T computed before the timed call (compare with the same case without it)
CASES = ["8192x28672:1:64:32:2:2:1", "8192x28672:1:64:32:2:3:1", "8192x28672:1:64:32:2:4:1",
         "8192x28672:1:64:64:4:3:1", "28672x8192:1:64:64:4:3:4", "28672x8192:1:64:32:2:3:2", "4096x14336:1:64:32:2:3:1",
         "14336x4096:1:64:64:4:3:4", "8192x28672:16:64:32:2:3:1", "8192x28672:16:64:64:4:3:1",
         "28672x8192:16:64:64:4:3:4", "8192x28672:1:64:32:2:3:1:2", "8192x28672:1:64:64:4:3:1:2",
         "8192x28672:1:64:32:2:4:1:4:1", "8192x28672:1:64:32:2:6:1:4:1", "28672x8192:1:64:64:4:4:4:4:1",
         "8192x28672:16:64:32:2:4:1:4:1", "8192x28672:1:64:32:2:3:1:4:0:32", "8192x28672:16:64:32:2:3:1:4:0:32",
         "4096x14336:1:64:32:2:3:1:4:0:32"]
# the shipped kernel's tuned configs in session 9's acceptance run (BM, BN, split, warps, stages, half), timed beside
WA_TUNED = {("4096x14336", 1): [8, 32, 1, 2, 3, 0], ("4096x14336", 16): [16, 32, 1, 2, 3, 0],
            ("14336x4096", 1): [8, 64, 4, 4, 3, 0], ("14336x4096", 16): [16, 64, 8, 4, 2, 0],
            ("8192x28672", 1): [8, 32, 1, 2, 2, 0], ("8192x28672", 16): [16, 32, 1, 2, 3, 0],
            ("28672x8192", 1): [8, 128, 4, 8, 3, 0], ("28672x8192", 16): [16, 64, 4, 4, 2, 0]}


@gluon.jit
def _issue(w_smem, x_smem, q_ptr, x_ptr, i, stage, valid, rn_c, rm_c, jw, kx, N, M, KW, stride_xm,
           WPS: gl.constexpr, XS: gl.constexpr, XREG: gl.constexpr = False):
    """Start the copies of pipeline step ``i`` (a block, or a half block: its ``[BN, WPS]`` words and ``[BM, XS]``
    activations) into ``stage``."""
    wp = q_ptr + (rn_c.to(gl.int64) * KW)[:, None] + (i * WPS + jw)[None, :]
    _cp_async(w_smem.index(stage), wp, mask=(rn_c < N)[:, None] & valid)
    if not XREG:  # XREG: the activations are read from global memory (L1/L2) into the B operand instead
        xp = x_ptr + (rm_c.to(gl.int64) * stride_xm)[:, None] + (i * XS + kx)[None, :]
        _cp_async(x_smem.index(stage), xp, mask=(rm_c < M)[:, None] & valid)


@gluon.jit
def _pairs(w, shift: gl.constexpr, BITS: gl.constexpr, BN: gl.constexpr, J: gl.constexpr, a_l: gl.constexpr):
    """Words ``[BN, J/2]`` (32-bit dot-operand layout) whose bits ``shift ..`` and ``shift + 16 ..`` hold code pairs
    -> the bf16 ``c + q`` tile ``[BN, J]``."""
    v = w >> shift
    v2 = gl.reshape(gl.join(v, v), [BN, J])
    if BITS == 4:
        t = gl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;", "=r,r,r", [v2],
                                      dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        t = gl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00030003, 0x43004300, 0xea;", "=r,r,r", [v2],
                                      dtype=gl.bfloat16, is_pure=True, pack=2)
    return gl.convert_layout(t, a_l, assert_trivial=True)


@gluon.jit
def _scales(srow, zrow, g, ms, mz, valid, SYMMETRIC: gl.constexpr, HALF: gl.constexpr, BITS: gl.constexpr,
            a_l: gl.constexpr):
    """The group scales (fp32, rows of the accumulator) and ``c + zero point`` (bf16, rows of the A operand) of the
    4 groups (2 for a half block: the last two repeat them) from group ``g``."""
    ms = ms & valid
    mz = mz & valid
    s0 = gl.load(srow + g, mask=ms, other=1.0).to(gl.float32)
    s1 = gl.load(srow + g + 1, mask=ms, other=1.0).to(gl.float32)
    if HALF:
        s2 = s0
        s3 = s1
    else:
        s2 = gl.load(srow + g + 2, mask=ms, other=1.0).to(gl.float32)
        s3 = gl.load(srow + g + 3, mask=ms, other=1.0).to(gl.float32)
    if SYMMETRIC:
        z0 = gl.full(s0.shape, 128.0 + (1 << (BITS - 1)), gl.bfloat16, layout=gl.SliceLayout(1, a_l))  # c + mid
        z1 = z0
        z2 = z0
        z3 = z0
    else:
        z0 = (gl.load(zrow + g, mask=mz, other=0).to(gl.float32) + 128.0).to(gl.bfloat16)
        z1 = (gl.load(zrow + g + 1, mask=mz, other=0).to(gl.float32) + 128.0).to(gl.bfloat16)
        if HALF:
            z2 = z0
            z3 = z1
        else:
            z2 = (gl.load(zrow + g + 2, mask=mz, other=0).to(gl.float32) + 128.0).to(gl.bfloat16)
            z3 = (gl.load(zrow + g + 3, mask=mz, other=0).to(gl.float32) + 128.0).to(gl.bfloat16)
    return s0, s1, s2, s3, z0, z1, z2, z3


@gluon.jit
def _lowrank(t_ptr, u_ptr, pid_m, pid_n, M, N, R, stride_tm, stride_un, BM: gl.constexpr, BN: gl.constexpr,
             BR: gl.constexpr, mma: gl.constexpr):
    """``[BN, BM]`` fp32 ``sum_r U[n, r] t[m, r]``, one outer product a rank in the accumulator's own layout (no
    layout change, few registers; the column loads are independent, so their latencies overlap)."""
    rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    out = gl.zeros([BN, BM], gl.float32, layout=mma)
    for r in gl.static_range(BR):
        u = gl.load(u_ptr + rn.to(gl.int64) * stride_un + r, mask=(rn < N) & (r < R), other=0.0).to(gl.float32)
        t = gl.load(t_ptr + rm.to(gl.int64) * stride_tm + r, mask=(rm < M) & (r < R), other=0.0)
        out = out + u[:, None] * t[None, :]
    return out


@gluon.jit
def gwa_kernel(x_ptr, out_ptr, q_ptr, s_ptr, z_ptr, t_ptr, u_ptr, M, N, KW, NB, blocks_per_split, G, R,
               stride_xm, stride_om, stride_tm, stride_un,
               SYMMETRIC: gl.constexpr, J: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr,
               ATOMIC: gl.constexpr, BITS: gl.constexpr = 4, HALF: gl.constexpr = False, BR: gl.constexpr = 0,
               SPF: gl.constexpr = True, XREG: gl.constexpr = False):
    gl.static_assert(J == 64, "the prototype takes groups of 128 inputs as two code positions of 64")
    gl.static_assert(BITS == 4 or BITS == 2, "int4 or int2")
    gl.static_assert(BITS == 4 or not HALF, "half-block stages are for int4")
    ITS: gl.constexpr = 2 if HALF else 1  # pipeline iterations (stages) a block: int4 halves are contiguous words
    WPS: gl.constexpr = J * BITS // 4 // ITS  # words a row per stage
    XS: gl.constexpr = 8 * J // ITS  # inputs per stage
    NW: gl.constexpr = gl.num_warps()
    H: gl.constexpr = J // 2
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    w_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=1)
    # global -> shared copies in 16-byte vectors
    wcp: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (WPS // 4), WPS // 4], [NW, 1], [1, 0])
    xcp: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])
    w_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    x_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    w_smem = gl.allocate_shared_memory(gl.int32, [S, BN, WPS], w_sl)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [1 if XREG else S, BM, 8 if XREG else XS], x_sl)
    rk_b = gl.arange(0, J, layout=gl.SliceLayout(1, b_l))  # XREG: a [J, BM] B-operand tile straight from x
    rm_b = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, b_l))
    xg = x_ptr + (rm_b.to(gl.int64) * stride_xm)[None, :] + rk_b[:, None]
    xg_m = (rm_b < M)[None, :]

    rn_c = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, wcp))
    jw = gl.arange(0, WPS, layout=gl.SliceLayout(0, wcp))
    rm_c = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, xcp))
    kx = gl.arange(0, XS, layout=gl.SliceLayout(0, xcp))
    # group scales (rows of the accumulator) and zero points (rows of the A operand)
    rn_s = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    rn_z = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, a_l))
    srow = s_ptr + rn_s.to(gl.int64) * G
    zrow = z_ptr + rn_z.to(gl.int64) * G

    b_lo = pid_k * blocks_per_split
    i_lo = b_lo * ITS
    n_it = (gl.minimum(b_lo + blocks_per_split, NB) - b_lo) * ITS
    for i in gl.static_range(S - 1):
        _issue(w_smem, x_smem, q_ptr, x_ptr, i_lo + i, i, i < n_it, rn_c, rm_c, jw, kx, N, M, KW, stride_xm, WPS,
               XS, XREG)
        async_copy.commit_group()

    acc = gl.zeros([BN, BM], gl.float32, layout=mma)
    n0, n1, n2, n3, m0, m1, m2, m3 = _scales(srow, zrow, i_lo * (4 // ITS), rn_s < N, rn_z < N, n_it > 0, SYMMETRIC,
                                             HALF, BITS, a_l)
    for it in range(0, n_it):
        _barrier()  # every warp is done with the stage that the next copies overwrite (read at it - 1)
        nxt = it + S - 1
        _issue(w_smem, x_smem, q_ptr, x_ptr, i_lo + nxt, nxt % S, nxt < n_it, rn_c, rm_c, jw, kx, N, M, KW,
               stride_xm, WPS, XS, XREG)
        async_copy.commit_group()
        # this stage's group scales and zero points (4 groups, or 2 for a half block): loaded one iteration ahead
        # (SPF), or here, before the wait, so that their latency overlaps it
        if SPF:
            s0, s1, s2, s3, z0, z1, z2, z3 = n0, n1, n2, n3, m0, m1, m2, m3
            n0, n1, n2, n3, m0, m1, m2, m3 = _scales(srow, zrow, (i_lo + it + 1) * (4 // ITS), rn_s < N, rn_z < N,
                                                     it + 1 < n_it, SYMMETRIC, HALF, BITS, a_l)
        else:
            s0, s1, s2, s3, z0, z1, z2, z3 = _scales(srow, zrow, (i_lo + it) * (4 // ITS), rn_s < N, rn_z < N,
                                                     it < n_it, SYMMETRIC, HALF, BITS, a_l)
        async_copy.wait_group(S - 1)  # this thread's copies of stage it are done
        _barrier()  # and every thread's
        ws = w_smem.index(it % S)
        xs = x_smem.index(0 if XREG else it % S)
        x0 = (i_lo + it) * XS  # this stage's first input
        if HALF:  # one word tile: positions u = 0..3 of this half (bits 4 u, 4 u + 16); groups 0 (u < 2) and 1
            w = ws.load(w_l)
            for u in gl.static_range(4):
                if u < 2:
                    s_u, z_u = s0, z0
                else:
                    s_u, z_u = s1, z1
                a = _pairs(w, 4 * u, 4, BN, J, a_l) - z_u[:, None]
                if XREG:
                    xu = gl.load(xg + x0 + u * J, mask=xg_m, other=0.0)
                else:
                    xu = xs.slice(u * J, J, dim=1).permute([1, 0]).load(b_l)
                if u % 2 == 0:
                    p = mma_v2(a, xu, gl.zeros([BN, BM], gl.float32, layout=mma))
                else:
                    p = mma_v2(a, xu, p)
                    acc = acc + p * s_u[:, None]
        else:
            if BITS == 4:  # positions 0-3 in the first H words, 4-7 in the next H (bits 4 u, 4 u + 16)
                w_lo = ws.slice(0, H, dim=1).load(w_l)
                w_hi = ws.slice(H, H, dim=1).load(w_l)
            else:  # all eight positions in H words (bits 2 t, 2 t + 16)
                w_lo = ws.load(w_l)
                w_hi = w_lo
            for u in gl.static_range(4):  # positions u (groups 0, 1) and u + 4 (groups 2, 3); a group is 2 positions
                if u < 2:
                    s_lo, z_lo, s_hi, z_hi = s0, z0, s2, z2
                else:
                    s_lo, z_lo, s_hi, z_hi = s1, z1, s3, z3
                if BITS == 4:
                    lo = _pairs(w_lo, 4 * u, 4, BN, J, a_l) - z_lo[:, None]
                    hi = _pairs(w_hi, 4 * u, 4, BN, J, a_l) - z_hi[:, None]
                else:
                    lo = _pairs(w_lo, 2 * u, 2, BN, J, a_l) - z_lo[:, None]
                    hi = _pairs(w_lo, 2 * u + 8, 2, BN, J, a_l) - z_hi[:, None]
                if XREG:
                    x_lo = gl.load(xg + x0 + u * J, mask=xg_m, other=0.0)
                    x_hi = gl.load(xg + x0 + (u + 4) * J, mask=xg_m, other=0.0)
                else:
                    x_lo = xs.slice(u * J, J, dim=1).permute([1, 0]).load(b_l)
                    x_hi = xs.slice((u + 4) * J, J, dim=1).permute([1, 0]).load(b_l)
                if u % 2 == 0:
                    p_lo = mma_v2(lo, x_lo, gl.zeros([BN, BM], gl.float32, layout=mma))
                    p_hi = mma_v2(hi, x_hi, gl.zeros([BN, BM], gl.float32, layout=mma))
                else:
                    p_lo = mma_v2(lo, x_lo, p_lo)
                    p_hi = mma_v2(hi, x_hi, p_hi)
                    acc = acc + p_lo * s_lo[:, None] + p_hi * s_hi[:, None]
    async_copy.wait_group(0)
    if BR > 0:  # the fused Sum's low-rank term U t^T (split 0 only), t = x V^T given as [M, R] fp32, U as [N, R]
        if pid_k == 0:
            acc = acc + _lowrank(t_ptr, u_ptr, pid_m, pid_n, M, N, R, stride_tm, stride_un, BM, BN, BR, mma)
    rm_o = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    optr = out_ptr + (rm_o.to(gl.int64) * stride_om)[None, :] + rn_s[:, None]
    omask = (rn_s < N)[:, None] & (rm_o < M)[None, :]
    if ATOMIC:
        gl.atomic_add(optr, acc, mask=omask)
    else:
        gl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


def launch(x: torch.Tensor, lay, bn: int, warps: int, stages: int, split: int, out: torch.Tensor,
           bits: int = 4, half: int = 0, lr: tuple[torch.Tensor, torch.Tensor] | None = None, spf: int = 1,
           xreg: int = 0) -> None:
    """``lr``: ``(t [M, R] fp32, U [N, R])`` for the Sum's low-rank term, ``t = x V^T`` computed before the call."""
    m, k = x.shape
    n, j = lay.q.shape[0], lay.j
    bm = 8 if m <= 8 else 16
    blocks = k // (8 * j)
    per = -(-blocks // split)
    t, u = lr if lr is not None else (x, x)
    rank = u.shape[1] if lr is not None else 0
    gwa_kernel[(-(-m // bm), -(-n // bn), split)](
        x, out, lay.q, lay.scales, lay.zeros if lay.zeros is not None else lay.scales, t, u, m, n, k * bits // 32,
        blocks, per, k // 128, rank, x.stride(0), out.stride(0), t.stride(0), u.stride(0), SYMMETRIC=lay.zeros is None,
        J=j, BM=bm, BN=bn, S=stages, ATOMIC=split > 1, BITS=bits, HALF=bool(half), BR=-(-rank // 8) * 8,
        SPF=bool(spf), XREG=bool(xreg), num_warps=warps)


def parse_case(case: str) -> tuple[str, int, int, int, int, int, int, int, int, int, int, int]:
    """``shape:batch:J:BN:warps:stages:split[:bits[:half[:rank[:spf[:xreg]]]]]`` -> its fields (bits 4, half 0, rank
    0, spf 1, xreg 0 unless given; a rank makes it the Sum with a low-rank term of that rank; spf 0 loads each stage's
    scales in its own iteration instead of one ahead; xreg 1 reads the activations from global memory straight into
    the B operand's registers, so the shared-memory ring holds only the words)."""
    f = case.split(":")
    return (f[0], *(int(v) for v in f[1:7]),
            *(int(f[i]) if len(f) > i else d for i, d in ((7, 4), (8, 0), (9, 0), (10, 1), (11, 0))))


def compile_only(cases: list[str]) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fails = 0
    for case in cases:
        shape, m, j, bn, warps, stages, split, bits, half, rank, spf, xreg = parse_case(case)
        for split in dict.fromkeys([split, 1]):
            names = list(gwa_kernel.arg_names)
            types = {"x_ptr": "*bf16", "out_ptr": "*fp32" if split > 1 else "*bf16", "q_ptr": "*i32",
                     "s_ptr": "*fp16", "z_ptr": "*u8", "t_ptr": "*fp32", "u_ptr": "*fp16"}
            consts = dict(SYMMETRIC=False, J=j, BM=8 if m <= 8 else 16, BN=bn, S=stages, ATOMIC=split > 1, BITS=bits,
                          HALF=bool(half), BR=-(-rank // 8) * 8, SPF=bool(spf), XREG=bool(xreg))
            sig = {nm: "constexpr" if nm in consts else types.get(nm, "i32") for nm in names}
            div = [i for i, nm in enumerate(names) if nm in types or nm in ("KW", "stride_xm", "stride_om",
                                                                                "stride_tm", "stride_un")]
            try:
                ck = triton.compile(GluonASTSource(gwa_kernel, sig, consts, {(i,): [["tt.divisibility", 16]]
                                                                             for i in div}),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                print(f"{case} split {split}: ok, {ck.metadata.shared} B shared", flush=True)
            except Exception as e:  # report every failure
                fails += 1
                print(f"{case} split {split}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    return fails


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES),
                    help="shape:batch:J:BN:warps:stages:split[:bits[:half[:rank[:spf[:xreg]]]]],...")
    ap.add_argument("--compile-only", action="store_true", help="build for sm_90 without a GPU")
    ap.add_argument("--tune-wa", action="store_true", help="time the shipped dispatcher's tuned choice for each "
                    "(shape, batch) beside the cases, instead of the fixed configs in WA_TUNED")
    args = ap.parse_args()
    cases = sorted(args.cases.split(","), key=lambda c: (parse_case(c)[0], parse_case(c)[7]))  # one shape at a time
    if args.compile_only:
        sys.exit(1 if compile_only(cases) else 0)
    from kernels import bench_graph, n_copies

    from tensorslim.kernels import dispatch
    from tensorslim.kernels.reference import relative_error
    from wa_probe import call as wa_call
    from wa_probe import load_variants, make

    base = load_variants(tempfile.mkdtemp())["base"]
    results = []
    t0 = time.time()
    weights, timed = {}, {}  # per (shape, bits): the weight copies; the bf16 and "wa" times, each measured once
    for case in cases:
        shape, m, j, bn, warps, stages, split, bits, half, rank, spf, xreg = parse_case(case)
        k, n = (int(v) for v in shape.split("x"))
        if (shape, bits) not in weights:
            weights.clear()  # one shape's copies at a time on the GPU
            weights[(shape, bits)] = [make(shape, bits, "cuda", seed=i) for i in range(n_copies(n * k * bits // 8))]
        w, lay = weights[(shape, bits)][0]
        lays = [c[1] for c in weights[(shape, bits)]]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(m))
        ref = x.float() @ w.decode().float().t()
        lr = None
        if rank:  # the Sum: t = x V^T before the call (timed apart from it: "epilogue only"), U in fp16
            v = torch.randn(rank, k, device="cuda") * 0.02
            u = (torch.randn(n, rank, device="cuda") * 0.02).half()
            t = (x.float() @ v.t()).contiguous()
            lr = (t, u)
            ref = ref + t @ u.float().t()
        row = {"case": case}
        try:  # checked in fp32 (a NaN-poisoned output without split-K, a zeroed one with it)
            out = (torch.full((m, n), float("nan"), device="cuda") if split == 1 else
                   torch.zeros(m, n, device="cuda"))
            launch(x, lay, bn, warps, stages, split, out, bits, half, lr, spf, xreg)
            torch.cuda.synchronize()
            row["err"] = relative_error(out, ref)
            if (shape, m) not in timed:
                dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
                timed[(shape, m)] = bench_graph([lambda d=d: torch.nn.functional.linear(x, d) for d in dense])
                del dense
            row["bf16_us"] = timed[(shape, m)]

            def g(L):  # as wa_probe.call times the shipped kernel: bf16 out, or a zeroed fp32 one for split-K
                o = (torch.empty(m, n, device="cuda", dtype=torch.bfloat16) if split == 1 else
                     torch.zeros(m, n, device="cuda", dtype=torch.float32))
                launch(x, L, bn, warps, stages, split, o, bits, half, lr, spf, xreg)
                return o

            row["gluon_us"] = bench_graph([lambda L=L: g(L) for L in lays])
            if args.tune_wa:  # what CompressedLinear would run: the dispatcher's tuned path on the same weights
                key = (shape, m, bits, "tuned")
                if key not in timed:
                    ints = [dispatch.layout(c[0]) for c in weights[(shape, bits)]]
                    choice = dispatch.tune(ints[0], m, torch.bfloat16)
                    timed[key] = (bench_graph([lambda L=L: dispatch.run_choice(choice, L, x, None, torch.bfloat16)
                                               for L in ints]), [choice[0], list(choice[1])])
                row["wa_us"], row["wa_config"] = timed[key]
            else:
                cfg = WA_TUNED.get((shape, m), [8 if m <= 8 else 16, 32, 1, 2, 3, 0])
                row["wa_config"] = cfg
                key = (shape, m, bits, tuple(cfg))
                if key not in timed:
                    timed[key] = bench_graph([lambda L=L: wa_call(base, "base", x, L, bits, cfg) for L in lays])
                row["wa_us"] = timed[key]
        except Exception as e:  # a case that fails is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(json.dumps(row), f"[{time.time() - t0:.0f} s]", flush=True)
        results.append(row)
        out_dir = os.environ.get("OUT") or "runs"  # after every case: a run cut short keeps what it measured
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gluon_wa.json.tmp"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)
        os.replace(os.path.join(out_dir, "gluon_wa.json.tmp"), os.path.join(out_dir, "gluon_wa.json"))


if __name__ == "__main__":
    main()
