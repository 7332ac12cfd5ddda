"""``torch.library`` custom ops for the float (FP8/MX/NVFP4), binary-coded (BCQ) and 2:4 sparse + int4 kernels,
with fake implementations for ``torch.compile``. Same conventions as :mod:`.ops`:
``config = [BM, BN, BK, SPLIT_K, num_warps, num_stages]`` (BM unused by the one-row paths); ``SPLIT_K > 1`` writes
into a zeroed fp32 buffer with atomics. ``launch_*`` write into a caller's buffer (tests poison it with NaN).

- ``tensorslim::float_mm(x, q, scales, global_scale?, meta=[k, elem, scale_mode, group], path, config, out_dtype)``,
  path "gemv" | "gemm";
- ``tensorslim::fp4_wa_mm(x, q, sc, meta=[k, group, j, nv], post, config=[BM, BN, SPLIT_K, num_warps, num_stages],
  out_dtype)``: MXFP4 (``nv = 0``) and NVFP4 (``nv = 1``, ``post = 1/g``) through the weights-as-A kernel (:mod:`.triton.wa_fp4`, layout :func:`.layout_ext.fp4_wa_layout`); split-K
  reduces serially in :func:`.ops.split_scratch`'s workspace like ``wa_mm``;
- ``tensorslim::bcq_wa_mm(x, planes, a2, c, meta=[k, q, group, j], config=[BM, BN, SPLIT_K, num_warps, num_stages],
  out_dtype)``: BCQ through the weights-as-A kernel (:mod:`.triton.wa_bcq`, layout :func:`.layout_ext.bcq_wa_layout`);
- ``tensorslim::fp4_wa_dequant(q, sc, meta, post, out_dtype)`` and ``tensorslim::bcq_wa_dequant(planes, a2, c, meta,
  out_dtype)``: the dense ``W [N, K]`` from those repacks (:mod:`.triton.wa_ext_dequant`; the "dequant" path);
- ``tensorslim::bcq_mm(x, planes, alphas, offsets, meta=[k, q, group], path, config, out_dtype)``, path "lut" |
  "gemm";
- ``tensorslim::sparse24_mm(x, qa, idx, scales, zeros?, meta=[k, group, symmetric], path, config, out_dtype)``,
  path "gemv" | "gemm".
Importing this module imports Triton (the dispatcher does so lazily, on the first CUDA call).
"""

from __future__ import annotations

import torch
import triton

from .triton.bcq_mm import bcq_gemm_kernel, bcq_lut_gemv_kernel, bcq_lut_kernel
from .triton.float_mm import float_gemm_kernel, float_gemv_kernel
from .layout import check_wa_launch
from .ops import _into_new
from .triton.wa_bcq import wa_bcq_kernel
from .triton.wa_ext_dequant import bcq_wa_dequant_kernel, fp4_wa_dequant_kernel
from .triton.wa_fp4 import wa_fp4_kernel
from .triton.sparse24_mm import sparse24_gemm_kernel, sparse24_gemv_kernel

Tensor = torch.Tensor


def _check(path: str, paths: tuple[str, ...], k: int, config: list[int], m: int) -> None:
    bm, bn, bk, split_k, _, _ = config
    assert path in paths, path
    assert bk >= 16 and bk & (bk - 1) == 0 and k % bk == 0, (k, bk)
    assert bn >= 16 and bn & (bn - 1) == 0, bn
    assert split_k >= 1 and (k // bk) % split_k == 0, (k, bk, split_k)
    assert path in ("gemv", "lut") or (bm >= 16 and bm & (bm - 1) == 0), bm


def pre_scale(elem: int, scale_mode: int, dtype: torch.dtype) -> bool:
    """May the float GEMM multiply block scales into the tile before the dot (exact in ``dtype``)?"""
    if scale_mode == 2:  # E2M1 x E4M3: <= 6 significant bits, within fp16's normal range
        return True
    return scale_mode == 1 and dtype == torch.bfloat16  # x 2^e: exact where the exponent range is fp32's


def float_bk_ok(path: str, meta: list[int], bk: int, dtype: torch.dtype) -> bool:
    k, elem, scale_mode, group = meta
    if path == "gemm" and not pre_scale(elem, scale_mode, dtype):
        return group % bk == 0  # the tile lies inside one group
    return bk % group == 0 or group % bk == 0


def launch_float_mm(x: Tensor, q: Tensor, scales: Tensor, gs: Tensor | None, meta: list[int], path: str,
                    config: list[int], out: Tensor, *, force_pre_scale: bool | None = None) -> None:
    """``force_pre_scale`` overrides :func:`pre_scale` (tests: the bf16 pre-scaled tile cannot run on the CPU
    interpreter, whose bf16 ``tl.dot`` is broken, so it is exercised with fp16 activations in range)."""
    k, elem, scale_mode, group = meta
    bm, bn, bk, split_k, warps, stages = config
    m, n = x.shape[0], q.shape[1]
    _check(path, ("gemv", "gemm"), k, config, m)
    pre = pre_scale(elem, scale_mode, x.dtype) if force_pre_scale is None else force_pre_scale
    assert (bk % group == 0 or group % bk == 0) if pre or path == "gemv" else group % bk == 0, (meta, bk)
    assert split_k == 1 or out.dtype == torch.float32
    args = [x, out, q, scales, gs if gs is not None else scales, m, n, k, k // split_k, group, x.stride(0),
            out.stride(0)]
    if path == "gemv":
        float_gemv_kernel[(m, triton.cdiv(n, bn), split_k)](*args, ELEM=elem, SCALE=scale_mode, ATOMIC=split_k > 1,
                                                             BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    else:
        float_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](
            *args, ELEM=elem, SCALE=scale_mode, ATOMIC=split_k > 1, PRE_SCALE=pre,
            BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def _out(x: Tensor, n: int, config: list[int], out_dtype: torch.dtype) -> Tensor:
    if config[3] > 1:
        return torch.zeros((x.shape[0], n), dtype=torch.float32, device=x.device)
    return torch.empty((x.shape[0], n), dtype=out_dtype, device=x.device)


@torch.library.custom_op("tensorslim::float_mm", mutates_args=())
def float_mm(x: Tensor, q: Tensor, scales: Tensor, global_scale: Tensor | None, meta: list[int], path: str,
             config: list[int], out_dtype: torch.dtype) -> Tensor:
    x = x.contiguous()
    out = _out(x, q.shape[1], config, out_dtype)
    launch_float_mm(x, q, scales, global_scale, meta, path, config, out)
    return out if out.dtype == out_dtype else out.to(out_dtype)


@float_mm.register_fake
def _float_mm_fake(x, q, scales, global_scale, meta, path, config, out_dtype):
    return x.new_empty((x.shape[0], q.shape[1]), dtype=out_dtype)


def bcq_lut(x: Tensor) -> Tensor:
    """The LUT-GEMM tables ``[M, K/8, 256]`` fp32 of the activations ``x [M, K]``."""
    m, k = x.shape
    lut = torch.empty((m, k // 8, 256), dtype=torch.float32, device=x.device)
    bb = 16
    bcq_lut_kernel[(m, triton.cdiv(k // 8, bb))](x, lut, k, x.stride(0), BB=bb, num_warps=4)
    return lut


def launch_bcq_mm(x: Tensor, planes: Tensor, alphas: Tensor, offsets: Tensor, meta: list[int], path: str,
                  config: list[int], out: Tensor) -> None:
    k, nq, group = meta
    bm, bn, bk, split_k, warps, stages = config
    m, n = x.shape[0], planes.shape[2]
    _check(path, ("lut", "gemm"), k, config, m)
    assert bk % 32 == 0 and (path == "lut" or group % bk == 0), (path, group, bk)
    assert split_k == 1 or out.dtype == torch.float32
    ng = k // group
    if path == "lut":
        lut = bcq_lut(x)
        bcq_lut_gemv_kernel[(m, triton.cdiv(n, bn), split_k)](
            lut, out, planes, alphas, offsets, m, n, k, k // split_k, group, ng, out.stride(0),
            Q=nq, ATOMIC=split_k > 1, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    else:
        bcq_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](
            x, out, planes, alphas, offsets, m, n, k, k // split_k, group, ng, x.stride(0), out.stride(0),
            Q=nq, ATOMIC=split_k > 1, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


@torch.library.custom_op("tensorslim::bcq_mm", mutates_args=())
def bcq_mm(x: Tensor, planes: Tensor, alphas: Tensor, offsets: Tensor, meta: list[int], path: str,
           config: list[int], out_dtype: torch.dtype) -> Tensor:
    x = x.contiguous()
    out = _out(x, planes.shape[2], config, out_dtype)
    launch_bcq_mm(x, planes, alphas, offsets, meta, path, config, out)
    return out if out.dtype == out_dtype else out.to(out_dtype)


@bcq_mm.register_fake
def _bcq_mm_fake(x, planes, alphas, offsets, meta, path, config, out_dtype):
    return x.new_empty((x.shape[0], planes.shape[2]), dtype=out_dtype)


def launch_sparse24_mm(x: Tensor, qa: Tensor, idx: Tensor, scales: Tensor, zeros: Tensor | None, meta: list[int],
                       path: str, config: list[int], out: Tensor) -> None:
    k, group, symmetric = meta
    bm, bn, bk, split_k, warps, stages = config
    m, n = x.shape[0], qa.shape[1]
    _check(path, ("gemv", "gemm"), k, config, m)
    assert bk >= 32 and group % bk == 0, (group, bk)
    assert split_k == 1 or out.dtype == torch.float32
    args = [x, out, qa, idx, scales, zeros if zeros is not None else scales, m, n, k, k // split_k, group,
            x.stride(0), out.stride(0)]
    if path == "gemv":
        sparse24_gemv_kernel[(m, triton.cdiv(n, bn), split_k)](
            *args, SYMMETRIC=bool(symmetric), ATOMIC=split_k > 1, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    else:
        sparse24_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](
            *args, SYMMETRIC=bool(symmetric), ATOMIC=split_k > 1, BM=bm, BN=bn, BK=bk, num_warps=warps,
            num_stages=stages)


@torch.library.custom_op("tensorslim::sparse24_mm", mutates_args=())
def sparse24_mm(x: Tensor, qa: Tensor, idx: Tensor, scales: Tensor, zeros: Tensor | None, meta: list[int],
                path: str, config: list[int], out_dtype: torch.dtype) -> Tensor:
    x = x.contiguous()
    out = _out(x, qa.shape[1], config, out_dtype)
    launch_sparse24_mm(x, qa, idx, scales, zeros, meta, path, config, out)
    return out if out.dtype == out_dtype else out.to(out_dtype)


@sparse24_mm.register_fake
def _sparse24_mm_fake(x, qa, idx, scales, zeros, meta, path, config, out_dtype):
    return x.new_empty((x.shape[0], qa.shape[1]), dtype=out_dtype)


def launch_fp4_wa(x: Tensor, q: Tensor, sc: Tensor, meta: list[int], post: float, config: list[int], out: Tensor,
                  scratch: tuple[Tensor, Tensor] | None = None) -> None:
    """MXFP4 / NVFP4 "wa" into ``out [M, N]`` (fp32 and zeroed when ``SPLIT_K > 1`` without ``scratch``; with it,
    split-K reduces serially in that zeroed workspace and ``out`` may be of any dtype and content, as
    :func:`.ops.launch_wa`). MX: the caller checks that the layout's exponents suit ``x``'s dtype
    (:meth:`.layout_ext.FP4WALayout.dtype_ok`)."""
    k, group, j, nv = meta
    bm, bn, split_k, num_warps, num_stages = config[:5]
    m, n = x.shape[0], q.shape[0]
    assert not nv or (group == 16 and j == 32), (group, j)
    check_wa_launch(k, max(group, j), 4, j, config[:5])  # NVFP4: two 16-blocks a code position
    assert x.dtype in (torch.bfloat16, torch.float16), x.dtype
    serial = split_k > 1 and scratch is not None
    assert split_k == 1 or serial or out.dtype == torch.float32
    ws, cnt = scratch if serial else (out, out)
    blocks = k // (8 * j)
    wa_fp4_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](
        x, out, q, sc, ws, cnt, m, n, k // 8, blocks, -(-blocks // split_k), k // group, x.stride(0), out.stride(0),
        float(post), GROUP=group, J=j, BM=bm, BN=bn, USE_ASM=x.device.type == "cuda", ATOMIC=split_k > 1,
        SERIAL=serial, NV=bool(nv), num_warps=num_warps, num_stages=num_stages)


@torch.library.custom_op("tensorslim::fp4_wa_mm", mutates_args=())
def fp4_wa_mm(x: Tensor, q: Tensor, sc: Tensor, meta: list[int], post: float, config: list[int],
              out_dtype: torch.dtype) -> Tensor:
    m, n = x.shape[0], q.shape[0]
    return _into_new(x, n, config[2], out_dtype,
                     lambda xc, out, scratch: launch_fp4_wa(xc, q, sc, meta, post, config, out, scratch),
                     triton.cdiv(m, config[0]) * triton.cdiv(n, config[1]))


@fp4_wa_mm.register_fake
def _fp4_wa_mm_fake(x, q, sc, meta, post, config, out_dtype):
    return x.new_empty((x.shape[0], q.shape[0]), dtype=out_dtype)


def launch_bcq_wa(x: Tensor, planes: Tensor, a2: Tensor, c: Tensor, meta: list[int], config: list[int], out: Tensor,
                  scratch: tuple[Tensor, Tensor] | None = None) -> None:
    """BCQ "wa" into ``out [M, N]``, split-K as :func:`launch_fp4_wa`."""
    k, q, group, j = meta
    bm, bn, split_k, num_warps, num_stages = config[:5]
    m, n = x.shape[0], planes.shape[1]
    assert x.dtype in (torch.bfloat16, torch.float16), x.dtype
    assert 1 <= q <= 4 and k % (16 * j) == 0 and group % j == 0 and (16 * j) % group == 0, (k, q, group, j)
    assert bm >= 8 and bm & (bm - 1) == 0 and bn >= 16 and bn & (bn - 1) == 0, (bm, bn)
    blocks = k // (16 * j)
    assert 1 <= split_k <= blocks, (blocks, split_k)
    serial = split_k > 1 and scratch is not None
    assert split_k == 1 or serial or out.dtype == torch.float32
    ws, cnt = scratch if serial else (out, out)
    wa_bcq_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](
        x, out, planes, a2, c, ws, cnt, m, n, k // 32, blocks, -(-blocks // split_k), k // group, x.stride(0),
        out.stride(0), planes.stride(0), a2.stride(0), Q=q, GROUP=group, J=j, BM=bm, BN=bn,
        USE_ASM=x.device.type == "cuda", ATOMIC=split_k > 1, SERIAL=serial, num_warps=num_warps,
        num_stages=num_stages)


@torch.library.custom_op("tensorslim::bcq_wa_mm", mutates_args=())
def bcq_wa_mm(x: Tensor, planes: Tensor, a2: Tensor, c: Tensor, meta: list[int], config: list[int],
              out_dtype: torch.dtype) -> Tensor:
    m, n = x.shape[0], planes.shape[1]
    return _into_new(x, n, config[2], out_dtype,
                     lambda xc, out, scratch: launch_bcq_wa(xc, planes, a2, c, meta, config, out, scratch),
                     triton.cdiv(m, config[0]) * triton.cdiv(n, config[1]))


@bcq_wa_mm.register_fake
def _bcq_wa_mm_fake(x, planes, a2, c, meta, config, out_dtype):
    return x.new_empty((x.shape[0], planes.shape[1]), dtype=out_dtype)


DEQUANT_BN = 32  # rows a dequant program (one block of inputs each)


def launch_fp4_wa_dequant(q: Tensor, sc: Tensor, meta: list[int], post: float, out: Tensor) -> None:
    """Dense ``W [N, K]`` of an MXFP4 / NVFP4 "wa" repack into ``out`` (bf16 or fp16; MX: the caller checks
    ``FP4WALayout.dtype_ok``)."""
    k, group, j, nv = meta
    n = q.shape[0]
    assert out.shape == (n, k) and out.dtype in (torch.bfloat16, torch.float16), (out.shape, out.dtype)
    assert k % (8 * j) == 0 and (not nv or (group == 16 and j == 32)), (k, group, j, nv)
    fp4_wa_dequant_kernel[(triton.cdiv(n, DEQUANT_BN), k // (8 * j))](
        q, sc, out, n, k // 8, k // group, out.stride(0), float(post), GROUP=group, J=j, BN=DEQUANT_BN, NV=bool(nv))


@torch.library.custom_op("tensorslim::fp4_wa_dequant", mutates_args=())
def fp4_wa_dequant(q: Tensor, sc: Tensor, meta: list[int], post: float, out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(q.shape[0], meta[0], device=q.device, dtype=out_dtype)
    launch_fp4_wa_dequant(q, sc, meta, post, out)
    return out


@fp4_wa_dequant.register_fake
def _fp4_wa_dequant_fake(q, sc, meta, post, out_dtype):
    return q.new_empty((q.shape[0], meta[0]), dtype=out_dtype)


def launch_bcq_wa_dequant(planes: Tensor, a2: Tensor, c: Tensor, meta: list[int], out: Tensor) -> None:
    """Dense ``W [N, K]`` of a BCQ "wa" repack into ``out`` (bf16 or fp16)."""
    k, q, group, j = meta
    n = planes.shape[1]
    assert out.shape == (n, k) and out.dtype in (torch.bfloat16, torch.float16), (out.shape, out.dtype)
    assert 1 <= q <= 4 and k % (16 * j) == 0 and group % j == 0 and (16 * j) % group == 0, (k, q, group, j)
    bcq_wa_dequant_kernel[(triton.cdiv(n, DEQUANT_BN), k // (16 * j))](
        planes, a2, c, out, n, k // 32, k // group, out.stride(0), planes.stride(0), a2.stride(0), Q=q, GROUP=group,
        J=j, BN=DEQUANT_BN)


@torch.library.custom_op("tensorslim::bcq_wa_dequant", mutates_args=())
def bcq_wa_dequant(planes: Tensor, a2: Tensor, c: Tensor, meta: list[int], out_dtype: torch.dtype) -> Tensor:
    out = torch.empty(planes.shape[1], meta[0], device=planes.device, dtype=out_dtype)
    launch_bcq_wa_dequant(planes, a2, c, meta, out)
    return out


@bcq_wa_dequant.register_fake
def _bcq_wa_dequant_fake(planes, a2, c, meta, out_dtype):
    return planes.new_empty((planes.shape[1], meta[0]), dtype=out_dtype)
