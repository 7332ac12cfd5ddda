"""``t = x V^T`` of a fused ``Sum(IntGroup, LowRank)`` in K-chunk partial sums, one launch, on the tensor cores.

The integer kernels add the low-rank term ``U t^T`` in their epilogue; ``t`` needs all K inputs, so it is computed
before them. One program per (K chunk, row tile, rank tile) writes ``tp[c, m, r] = sum_{k in chunk c} x[m, k] V[r,
k]`` in fp32, every element written, so there is no zeroing and no atomics; the "wa" kernel sums the ``C`` partials
in its epilogue, the others take ``tp.sum(0)``. ``V`` comes as ``P`` parts in the activation dtype whose sum is ``V``
exactly (:func:`tensorslim.kernels.dispatch.v_parts`: fp16 factors with bf16 activations are a bf16 high part plus
the 3 mantissa bits left), so each part's ``tl.dot`` has exact products and fp32 accumulation, as an fp32 GEMV would,
at tensor-core speed (an fp32 ``ieee`` dot took 40 us for 8192 inputs, rank 32, on the H100).

``PDL`` (Hopper and later, launched by :func:`tensorslim.kernels.ops.wa_mm`): every program first lets the next
kernel launch (programmatic dependent launch), so the "wa" kernel streams its weights while ``t`` is computed and
waits for this grid only in its epilogue (``gdc_wait``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from .gdc import gdc_launch_dependents


@triton.jit
def lowrank_t_kernel(x_ptr, v_ptr, tp_ptr, M, K, R, chunk, stride_xm, stride_vp, stride_vr,
                     P: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:
        gdc_launch_dependents()
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    k_lo = pid_c * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + kk
        km = ks < k_hi
        xt = tl.load(x_ptr + (rm.to(tl.int64) * stride_xm)[:, None] + ks[None, :],
                     mask=(rm[:, None] < M) & km[None, :], other=0.0)
        vptr = v_ptr + (rr.to(tl.int64) * stride_vr)[None, :] + ks[:, None]  # [BK, BR] of part 0
        vmask = (rr[None, :] < R) & km[:, None]
        for p in tl.static_range(P):
            acc = tl.dot(xt, tl.load(vptr + p * stride_vp, mask=vmask, other=0.0), acc)
    tl.store(tp_ptr + pid_c * M * R + rm[:, None] * R + rr[None, :], acc, mask=(rm[:, None] < M) & (rr[None, :] < R))
