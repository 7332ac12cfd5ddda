"""``torch.library`` custom ops around the Triton kernels, with fake (meta) implementations for ``torch.compile``.

Ops (namespace ``tensorslim``):
- ``int_mm(x2d, qa, qb?, scales, zeros?, t?, u?, meta, path, config, out_dtype)`` -> ``[M, N]``: integer-group
  multiply from the kernel layout (:mod:`.layout`), ``path`` "gemv", "gemm", "gemmp" (single-plane codes, one dot
  per code position) or "mma4" (int4, groups >= 128), optional fused low-rank term
  ``t @ u^T`` (``t = x V^T`` in fp32, ``u [N, r]``);
- ``wa_mm(x2d, q, scales, zeros?, vp?, u?, meta, config, out_dtype)``: int4, int3 or int2 (and ternary) with the
  weights as the tensor-core A operand (:mod:`.triton.wa`, its own layout :func:`.layout.wa_layout`), any batch;
  with ``vp`` (the low-rank term's ``V`` as exact parts, ``[P, r, K]``) and ``u`` it runs ``lowrank_t`` first and
  the "wa" kernel as its programmatic dependent launch (Hopper+): the weights stream while ``t`` is computed;
- ``int_dequant(qa, qb?, scales, zeros?, meta, out_dtype)`` -> dense ``W^T [K, N]`` (stored column order);
- ``wa_dequant(q, scales, zeros?, meta, out_dtype)`` -> dense ``W [N, K]`` from the weights-as-A layout (``meta`` as
  ``wa_mm``'s), for weights whose only kernel copy is that layout;
- ``lowrank_t(x2d, v_parts)`` -> ``[C, M, r]`` fp32 partial sums over K chunks of ``t = x V^T`` (``int_mm`` takes
  ``t`` = their sum; ``wa_mm`` computes them itself and sums them in its epilogue).
``meta = [k, bits, bits_a, bits_b, group, symmetric]``; ``config = [BM, BN, BK, SPLIT_K, num_warps, num_stages]``.

Importing this module imports Triton and registers the ops (the dispatcher imports it lazily, on the first CUDA
call). Under ``TRITON_INTERPRET=1`` the same ops run on CPU tensors, which is how the CI tests exercise the kernels.
"""

from __future__ import annotations

import torch
import triton

from .layout import check_config, check_wa_launch
from .triton.int_gemm import int_dequant_kernel, int_gemm_kernel
from .triton.int4_mma import int4_mma_kernel
from .triton.wa import wa_kernel
from .triton.wa_dequant import wa_dequant_kernel
from .triton.int_gemv import int_gemv_kernel
from .triton.gdc import HAS_GDC
from .triton.lowrank_t import lowrank_t_kernel

Tensor = torch.Tensor


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _into_new(x: Tensor, n: int, split_k: int, out_dtype: torch.dtype, launch, tiles: int = 0) -> Tensor:
    """Allocate ``[M, n]``, run ``launch(x, out, scratch)`` on contiguous ``x`` and return ``out`` in ``out_dtype``.
    Under split-K with ``tiles`` (output tiles of a kernel that reduces serially) the programs reduce in
    :func:`split_scratch`'s workspace straight into ``out_dtype``; otherwise (or when no workspace is at hand during a
    graph capture) they add atomically into a zeroed fp32 ``out``, returned cast."""
    x = x.contiguous()
    m = x.shape[0]
    scratch = split_scratch(x.device, m, n, tiles) if split_k > 1 and tiles else None
    if split_k > 1 and scratch is None:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    launch(x, out, scratch)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def launch_int_mm(x: Tensor, qa: Tensor, qb: Tensor | None, scales: Tensor, zeros: Tensor | None, t: Tensor | None,
                  u: Tensor | None, meta: list[int], path: str, config: list[int], out: Tensor) -> None:
    """Run the gemv/gemm kernel into ``out`` (``[M, N]``; fp32 and zeroed when ``SPLIT_K > 1``, atomics add into it)."""
    k, bits, bits_a, bits_b, group, symmetric = meta
    bm, bn, bk, split_k, num_warps, num_stages = config
    m, n = x.shape[0], qa.shape[1]
    check_config(path, meta, config, m)
    assert split_k == 1 or out.dtype == torch.float32
    has_lr = t is not None and u is not None
    r = t.shape[1] if has_lr else 1
    zt = zeros if zeros is not None else scales  # any pointer; unused when symmetric
    tt = t.contiguous() if has_lr else x
    uu = u.contiguous() if has_lr else x
    common = [
        x, out, qa, qb if qb is not None else qa, scales, zt, tt, uu,
        m, n, k, r, k // split_k, group, split_k,
        x.stride(0), out.stride(0), tt.stride(0), uu.stride(0),
    ]
    consts = dict(BITS=bits, BITS_A=bits_a, BITS_B=bits_b, SYMMETRIC=bool(symmetric),
                  HAS_LR=has_lr, BR=max(16, _next_pow2(r)), BM=bm, BN=bn, BK=bk,
                  num_warps=num_warps, num_stages=num_stages)
    if path == "gemv":
        int_gemv_kernel[(m, triton.cdiv(n, bn), split_k)](*common, **consts)
    elif path == "mma4":
        del common[3]  # no plane b
        int4_mma_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](
            *common, SYMMETRIC=bool(symmetric), HAS_LR=has_lr, BR=consts["BR"], BM=bm, BN=bn, BK=bk,
            USE_ASM=x.device.type == "cuda", num_warps=num_warps, num_stages=num_stages)
    else:
        int_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](*common, **consts, PLANES=path == "gemmp")


def pdl_ok(x: Tensor) -> bool:
    """Programmatic dependent launch: compiled Hopper (sm_90) or later GPU code with a Triton that has grid dependency
    control (3.3+), never the interpreter."""
    return HAS_GDC and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9


def launch_wa(x: Tensor, q: Tensor, scales: Tensor, zeros: Tensor | None, t: Tensor | None, u: Tensor | None,
              meta: list[int], config: list[int], out: Tensor, pdl: bool = False,
              scratch: tuple[Tensor, Tensor] | None = None) -> None:
    """Run the weights-as-A kernel (:mod:`.triton.wa`) into ``out`` ``[M, N]`` (fp32 and zeroed when ``SPLIT_K >
    1``, unless ``scratch``: then split-K reduces in that zeroed workspace, leaves it zeroed, and ``out`` may be of
    any dtype and content; :func:`split_scratch`). ``meta = [k, group, symmetric, j(, bits)]`` (layout blocks of
    ``8 j`` inputs; codes of 4 bits, the default, 3 or 2); ``config = [BM, BN, SPLIT_K, num_warps, num_stages(,
    half)]`` (``half``: int4 iterations of half a block, less shared memory a stage); optional low-rank term ``t @
    u^T`` as in :func:`int_mm`, where ``t`` may also be the ``[C, M, r]`` partial sums of :func:`lowrank_t`.
    ``pdl``: launched as the programmatic dependent of the kernel just before it, which wrote ``t`` (:func:`wa_mm`)."""
    k, group, symmetric, j = meta[:4]
    bits = meta[4] if len(meta) > 4 else 4
    bm, bn, split_k, num_warps, num_stages = config[:5]
    half = bool(config[5]) if len(config) > 5 else False
    m, n = x.shape[0], q.shape[0]
    check_wa_launch(k, group, bits, j, config)
    serial = split_k > 1 and scratch is not None
    assert split_k == 1 or serial or out.dtype == torch.float32
    if serial:
        ws, cnt = scratch
        assert ws.dtype == torch.float32 and ws.numel() >= m * n and cnt.numel() >= triton.cdiv(m, bm) * triton.cdiv(
            n, bn), "split_scratch() gives the workspace and counters of a serial split-K launch"
    else:
        ws, cnt = out, out  # unused
    blocks = k // (8 * j)
    has_lr = t is not None and u is not None
    tt = (t if t.dim() == 3 else t.unsqueeze(0)).contiguous() if has_lr else x.unsqueeze(0)  # [C, M, r] partials
    r = tt.shape[2] if has_lr else 1
    uu = u.contiguous() if has_lr else x
    wa_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)](
        x, out, q, scales, zeros if zeros is not None else scales, tt, uu, ws, cnt, m, n, k * bits // 32, blocks,
        -(-blocks // split_k), k // group, r, tt.shape[0], x.stride(0), out.stride(0), tt.stride(0), tt.stride(1),
        uu.stride(0),
        SYMMETRIC=bool(symmetric), GROUP=group, J=j, HAS_LR=has_lr, BR=max(16, _next_pow2(r)),
        TCP=_next_pow2(tt.shape[0]), BM=bm, BN=bn,
        USE_ASM=x.device.type == "cuda", ATOMIC=split_k > 1, BITS=bits, HALF=half, num_warps=num_warps,
        num_stages=num_stages, SERIAL=serial, **_pdl_args(pdl and has_lr))


def split_scratch(device: torch.device, m: int, n: int, tiles: int, stream: int | None = None,
                  capturing: bool | None = None) -> tuple[Tensor, Tensor] | None:
    """The zeroed fp32 workspace (>= ``m * n``) and int32 tile counters (>= ``tiles``) of a serial split-K launch
    (:func:`launch_wa`) on ``device``'s current stream (``stream``/``capturing``: that stream's id and whether it is
    capturing a CUDA graph, found here unless given), or None when a graph is being captured and no pair fits (the
    caller then falls back to a zeroed fp32 output, which is correct under capture).

    Every launch leaves its pair zeroed, so pairs are made once and kept for the process's life (a captured graph
    holds their addresses); a larger pair is made only when none fits, at least twice the size of the stream's
    largest. One pair per stream, so launches on concurrent streams never share one. Nothing is allocated while a
    graph is captured: eager calls keep one spare zeroed pair per device, which a stream capturing a graph for the
    first time adopts (the usual warm up on one stream, capture on another). Launches on the stream a graph was
    captured on must not run at the same time as that graph's replays."""
    if stream is None:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    if capturing is None:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    pairs = _SCRATCH.setdefault((str(device), stream), [])
    spares = _SCRATCH.setdefault((str(device), -1), [])  # the spare pairs (no stream has id -1)

    def fits(pair: tuple[Tensor, Tensor]) -> bool:
        return pair[0].numel() >= m * n and pair[1].numel() >= tiles

    hit = next((p for p in pairs if fits(p)), None)
    if hit is None and capturing:
        hit = next((p for p in spares if fits(p)), None)
        if hit is None:
            return None
        spares.remove(hit)
        pairs.append(hit)
    if hit is None:
        hit = _new_scratch(device, m * n, tiles, pairs)
        pairs.append(hit)
    if not capturing and not any(fits(p) for p in spares):  # spares no launch has used are dropped for a larger one
        spares[:] = [_new_scratch(device, m * n, tiles, spares)]
    return hit


def _new_scratch(device: torch.device, numel: int, tiles: int, others: list[tuple[Tensor, Tensor]]
                 ) -> tuple[Tensor, Tensor]:
    big = max((ws.numel() for ws, _ in others), default=0)
    big_c = max((c.numel() for _, c in others), default=0)
    return (torch.zeros(max(numel, 2 * big), dtype=torch.float32, device=device),
            torch.zeros(max(tiles, 2 * big_c, 1024), dtype=torch.int32, device=device))


_SCRATCH: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}  # split_scratch's pairs, by (device, stream)


def _pdl_args(pdl: bool) -> dict:
    return {"PDL": True, "launch_pdl": True} if pdl else {}


def lowrank_chunks(k: int) -> tuple[int, int]:
    """(chunks, inputs a chunk) of :func:`lowrank_t`: ~1024 inputs each (a multiple of 64), at most 16 chunks (the
    "wa" epilogue reads every partial)."""
    chunk = -(-k // (max(1, min(16, k // 1024)) * 64)) * 64
    return -(-k // chunk), chunk


def launch_lowrank_t(x: Tensor, vp: Tensor, pdl: bool = False, chunk: int | None = None) -> Tensor:
    """:func:`lowrank_t` on contiguous ``x``; ``pdl``: its programs let the next kernel (a programmatic dependent
    launch) start at once. ``chunk``: inputs a program (a multiple of 64; default :func:`lowrank_chunks`)."""
    vp = vp.contiguous()
    m, k = x.shape
    r = vp.shape[1]
    if chunk is None:
        c, chunk = lowrank_chunks(k)
    else:
        assert chunk % 64 == 0, chunk
        c = -(-k // chunk)
    out = torch.empty((c, m, r), dtype=torch.float32, device=x.device)
    br = min(64, max(16, _next_pow2(r)))
    lowrank_t_kernel[(c, triton.cdiv(m, 16), triton.cdiv(r, br))](
        x, vp, out, m, k, r, chunk, x.stride(0), vp.stride(0), vp.stride(1), P=vp.shape[0], BM=16, BR=br, BK=64,
        num_warps=4, **({"PDL": True} if pdl else {}))
    return out


@torch.library.custom_op("tensorslim::lowrank_t", mutates_args=())
def lowrank_t(x: Tensor, vp: Tensor) -> Tensor:
    """``[C, M, r]`` fp32: partial sums of ``x V^T`` over :func:`lowrank_chunks` K chunks, ``V = vp.sum(0)`` given
    as parts ``vp [P, r, K]`` in ``x``'s dtype (exact products, fp32 accumulation)."""
    return launch_lowrank_t(x.contiguous(), vp)


@lowrank_t.register_fake
def _lowrank_t_fake(x, vp):
    return x.new_empty((lowrank_chunks(x.shape[1])[0], x.shape[0], vp.shape[1]), dtype=torch.float32)


@torch.library.custom_op("tensorslim::wa_mm", mutates_args=())
def wa_mm(x: Tensor, q: Tensor, scales: Tensor, zeros: Tensor | None, vp: Tensor | None, u: Tensor | None,
          meta: list[int], config: list[int], out_dtype: torch.dtype) -> Tensor:
    """``x @ W^T`` (+ ``(x V^T) U^T`` with ``V`` given as exact parts ``vp``). The output is allocated first
    (zeroed only for split-K without a :func:`split_scratch` workspace), so that ``lowrank_t`` is the kernel right
    before "wa", which can then be its programmatic dependent launch on Hopper+."""
    def run(xc: Tensor, out: Tensor, scratch: tuple[Tensor, Tensor] | None) -> None:
        has_lr = vp is not None and u is not None
        pdl = has_lr and pdl_ok(xc)
        t = launch_lowrank_t(xc, vp, pdl) if has_lr else None
        launch_wa(xc, q, scales, zeros, t, u, meta, config, out, pdl, scratch)

    m, n = x.shape[0], q.shape[0]
    return _into_new(x, n, config[2], out_dtype, run, triton.cdiv(m, config[0]) * triton.cdiv(n, config[1]))


@wa_mm.register_fake
def _wa_mm_fake(x, q, scales, zeros, vp, u, meta, config, out_dtype):
    return x.new_empty((x.shape[0], q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("tensorslim::int_mm", mutates_args=())
def int_mm(x: Tensor, qa: Tensor, qb: Tensor | None, scales: Tensor, zeros: Tensor | None, t: Tensor | None,
           u: Tensor | None, meta: list[int], path: str, config: list[int], out_dtype: torch.dtype) -> Tensor:
    return _into_new(x, qa.shape[1], config[3], out_dtype,  # split-K adds atomically (no tiles: no workspace)
                     lambda xc, out, _: launch_int_mm(xc, qa, qb, scales, zeros, t, u, meta, path, config, out))


@int_mm.register_fake
def _int_mm_fake(x, qa, qb, scales, zeros, t, u, meta, path, config, out_dtype):
    return x.new_empty((x.shape[0], qa.shape[1]), dtype=out_dtype)


def launch_int_dequant(qa: Tensor, qb: Tensor | None, scales: Tensor, zeros: Tensor | None, meta: list[int],
                       out: Tensor) -> None:
    """Write the dense ``W^T [K, N]`` (stored column order) into ``out``."""
    k, bits, bits_a, bits_b, group, symmetric = meta
    n = qa.shape[1]
    bk = next(b for b in (64, 32) if group % b == 0)
    bn = 128
    zt = zeros if zeros is not None else scales
    int_dequant_kernel[(triton.cdiv(n, bn), k // bk)](
        out, qa, qb if qb is not None else qa, scales, zt, n, group,
        BITS=bits, BITS_A=bits_a, BITS_B=bits_b, SYMMETRIC=bool(symmetric), BN=bn, BK=bk, num_warps=4,
    )


@torch.library.custom_op("tensorslim::int_dequant", mutates_args=())
def int_dequant(qa: Tensor, qb: Tensor | None, scales: Tensor, zeros: Tensor | None, meta: list[int],
                out_dtype: torch.dtype) -> Tensor:
    out = torch.empty((meta[0], qa.shape[1]), dtype=out_dtype, device=qa.device)
    launch_int_dequant(qa, qb, scales, zeros, meta, out)
    return out


@int_dequant.register_fake
def _int_dequant_fake(qa, qb, scales, zeros, meta, out_dtype):
    return qa.new_empty((meta[0], qa.shape[1]), dtype=out_dtype)


def launch_wa_dequant(q: Tensor, scales: Tensor, zeros: Tensor | None, meta: list[int], out: Tensor) -> None:
    """Write the dense ``W [N, K]`` of a weights-as-A layout (``meta = [k, group, symmetric, j, bits]``) into ``out``
    (fp16/bf16, row stride free, unit column stride)."""
    k, group, symmetric, j = meta[:4]
    bits = meta[4] if len(meta) > 4 else 4
    n = q.shape[0]
    assert out.shape == (n, k) and out.stride(1) == 1 and out.dtype in (torch.float16, torch.bfloat16)
    bn = 32
    wa_dequant_kernel[(triton.cdiv(n, bn), k // (8 * j))](
        q, scales, zeros if zeros is not None else scales, out, n, k * bits // 32, k // group, out.stride(0),
        SYMMETRIC=bool(symmetric), GROUP=group, J=j, BITS=bits, BN=bn, USE_ASM=q.device.type == "cuda",
        num_warps=4,
    )


@torch.library.custom_op("tensorslim::wa_dequant", mutates_args=())
def wa_dequant(q: Tensor, scales: Tensor, zeros: Tensor | None, meta: list[int], out_dtype: torch.dtype) -> Tensor:
    out = torch.empty((q.shape[0], meta[0]), dtype=out_dtype, device=q.device)
    launch_wa_dequant(q, scales, zeros, meta, out)
    return out


@wa_dequant.register_fake
def _wa_dequant_fake(q, scales, zeros, meta, out_dtype):
    return q.new_empty((q.shape[0], meta[0]), dtype=out_dtype)
