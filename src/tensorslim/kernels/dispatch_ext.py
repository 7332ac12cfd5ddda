"""Dispatch for the float (FP8, MXFP4/MXFP8, NVFP4), binary-coded (BCQ) and 2:4 sparse + int4 kernels.

:mod:`.dispatch` hands every weight that is not integer-like here. Paths, chosen per (layout, batch bucket, dtype,
device) by timing the candidates in CUDA-graph replays (:func:`.dispatch.time_graph`, median), remembered in
``_TUNED``:
- float formats: "gemv" (1-16 rows), "gemm" (tensor cores, >= 2 rows), "reference" (>= 64 rows: decode to the
  activation dtype, then cuBLAS; rounds the weights to bf16 as a bf16 model would);
- BCQ: "lut" (LUT-GEMM, 1-16 rows), "gemm" (sign planes on tensor cores, any rows), "reference" (>= 64 rows), and
  "wa" (any rows; :mod:`.triton.wa_bcq`: the sign planes in a 1-bit weights-as-A repack, the per-group sums on the
  tensor cores, scaled in fp32), where the shape fits (:func:`.layout_ext.bcq_wa_reason`) and it passed a self-check;
- MXFP4, NVFP4 and BCQ, where "wa" runs, also "dequant" at 64+ rows (the "wa" repack decoded to the activation
  dtype by :mod:`.triton.wa_ext_dequant`, then cuBLAS: "reference" without its many PyTorch passes, and the
  many-row path of a prepared module, which keeps only that repack);
- MXFP4 and NVFP4 also "wa" (any rows; :mod:`.triton.wa_fp4`: the codes in int4's weights-as-A repack, decoded by
  bit tricks in registers straight into the tensor cores' A operand), where (MX) the block scales' exponent range
  suits the activation dtype (:attr:`.layout_ext.MX_WA_EXP`) and its inline-PTX decode passed a self-check on this device
  (:func:`wa_ext_verified`); the repacks are memoized beside the kernel layouts (:func:`wa_ext`);
- 2:4 + int4: "gemv" (1-16 rows), "gemm" (any rows >= 2), "reference" (>= 64 rows), and "dense" (any rows): the
  same weight as dense int4 (each pruned position holds its group's zero point, so it decodes to exactly 0), run by
  the integer dispatcher ("wa" where it fits). The sparse kernels read ~3.1 bits a weight but were slower than bf16 on
  the H100 (session 8 and 11); "dense" reads ~4.1 and runs at int4's speed. Its layout, the dense int4 "wa" repack,
  is the GPU copy that path keeps (:func:`dense_layout`).
Every candidate is a correct path, so the memo changes speed, never results. Layouts (:mod:`.layout_ext`) are
memoized per weight object (weak keys).

FP8 activations (``torch._scaled_mm``) are never chosen here: they quantize the activations, so they change results
beyond accumulation order and would have to be an explicit opt-in format (not built; see docs/kernels.md).
"""

from __future__ import annotations

import logging
import weakref
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch

from ..formats.base import CompressedWeight
from .dispatch import Choice, _pow2, _splits, time_graph, wa_candidates
from .layout_ext import (BCQKernelLayout, BCQWALayout, FloatKernelLayout, FP4WALayout, Sparse24KernelLayout,
                         bcq_wa_layout, bcq_wa_reason, ext_layout, ext_layout_reason, fp4_wa_layout, fp4_wa_reason)
from .reference import reference_linear

log = logging.getLogger(__name__)

_LAYOUTS: "weakref.WeakKeyDictionary[CompressedWeight, Any]" = weakref.WeakKeyDictionary()
_DENSE: "weakref.WeakKeyDictionary[CompressedWeight, Any]" = weakref.WeakKeyDictionary()
_WAEXT: "weakref.WeakKeyDictionary[CompressedWeight, Any]" = weakref.WeakKeyDictionary()
_WAEXT_CHECKED: dict[tuple, bool] = {}
_TUNED: dict[tuple, Choice] = {}


@lru_cache(maxsize=1)
def _ops() -> ModuleType | None:
    try:
        from . import ops_ext
    except ImportError as e:
        log.info("Triton kernels unavailable (%s); using reference multiplies", e)
        return None
    return ops_ext


def ext_reason(cw: CompressedWeight) -> str | None:
    reason = ext_layout_reason(cw)
    if reason is None and _ops() is None:
        reason = "triton is not installed"
    return reason


def layout(cw: CompressedWeight):
    lay = _LAYOUTS.get(cw)
    if lay is None:
        lay = ext_layout(cw)
        _LAYOUTS[cw] = lay
    return lay


def dense_int4(cw: CompressedWeight):
    """A 2:4 + int4 ``SparseWeight`` as the dense int4 ``IntGroupWeight`` that decodes to the same matrix, or None
    (an act-order inner weight). A compact group of ``g`` kept values spans ``2 g`` inputs (every run of 4 keeps 2),
    so the dense groups are ``2 g`` wide with the same scales and zero points; pruned positions hold the zero point."""
    import dataclasses

    from ..formats.intgroup import IntGroupWeight

    inner = cw.inner  # type: ignore[attr-defined]
    if inner.perm is not None:
        return None
    out, inp = cw.shape
    g = inner.format.group(inp // 2)
    codes, scale, zero = inner.unpacked()
    dense = zero.round().long().repeat_interleave(2 * g, dim=1)
    dense[cw.dense_mask()] = codes.reshape(-1)  # row-major order of the kept positions, as decode() places them
    fmt = dataclasses.replace(inner.format, group_size=None if 2 * g == inp else 2 * g)
    return IntGroupWeight.from_codes(fmt, dense, scale, zero)


def dense_layout(cw: CompressedWeight):
    """The integer dispatcher's runtime layout of :func:`dense_int4` (memoized per weight; the dense weight itself is
    not kept), or None."""
    from . import dispatch

    if cw not in _DENSE:
        dense = dense_int4(cw)
        _DENSE[cw] = None if dense is None else dispatch.runtime_layout(dense)
    return _DENSE[cw]


WALayoutExt = FP4WALayout | BCQWALayout


def wa_ext_reason(cw: CompressedWeight) -> str | None:
    """``None`` if the weights-as-A kernels (:mod:`.triton.wa_fp4`, :mod:`.triton.wa_bcq`) can run ``cw``."""
    from ..formats.bcq import BCQWeight

    return bcq_wa_reason(cw) if isinstance(cw, BCQWeight) else fp4_wa_reason(cw)


def wa_ext(cw: CompressedWeight) -> WALayoutExt:
    """The weights-as-A repack of an MXFP4 / NVFP4 / BCQ weight (memoized per weight)."""
    from ..formats.bcq import BCQWeight

    wl = _WAEXT.get(cw)
    if wl is None:
        wl = bcq_wa_layout(cw) if isinstance(cw, BCQWeight) else fp4_wa_layout(cw)
        _WAEXT[cw] = wl
    return wl


def _wa_kind(wl: WALayoutExt) -> str:
    return "bcq" if isinstance(wl, BCQWALayout) else "nvfp4" if wl.nv else "mxfp4"


def wa_ext_ok(cw: CompressedWeight, dtype: torch.dtype, device: torch.device | None = None) -> bool:
    """May "wa" run this MXFP4 / NVFP4 / BCQ weight with ``dtype`` activations (on ``device``: its self-check
    passed, or, inside a CUDA-graph capture where the check cannot run, had passed)?"""
    if dtype not in (torch.bfloat16, torch.float16) or wa_ext_reason(cw) is not None:
        return False
    wl = wa_ext(cw)
    if isinstance(wl, FP4WALayout) and not wl.dtype_ok(dtype):
        return False
    if device is None or device.type != "cuda":
        return True
    if torch.cuda.is_current_stream_capturing():
        return _WAEXT_CHECKED.get((_wa_kind(wl), str(device), dtype), False)
    return wa_ext_verified(_wa_kind(wl), device, dtype)


def launch_wa_ext(wl: WALayoutExt, x: torch.Tensor, config, out: torch.Tensor) -> None:
    """One "wa" launch into ``out`` (fp32 and zeroed for split-K: atomics; tests and benchmarks poison it)."""
    ops = _ops()
    if isinstance(wl, BCQWALayout):
        ops.launch_bcq_wa(x, wl.planes, wl.a2, wl.c, wl.meta(), list(config), out)
    else:
        ops.launch_fp4_wa(x, wl.q, wl.sc, wl.meta(), wl.post, list(config), out)


def wa_ext_mm(wl: WALayoutExt, x: torch.Tensor, config, out_dtype: torch.dtype) -> torch.Tensor:
    """The "wa" custom op (split-K reduced serially, output in ``out_dtype``)."""
    ops = _ops()
    if isinstance(wl, BCQWALayout):
        return ops.bcq_wa_mm(x, wl.planes, wl.a2, wl.c, wl.meta(), list(config), out_dtype)
    return ops.fp4_wa_mm(x, wl.q, wl.sc, wl.meta(), wl.post, list(config), out_dtype)


# (BN, warps, stages, half) for more than 32 rows: full-block tiles of 2-3 stages (the integer sets there are
# half-block configs, which these kernels do not have; with 512-input blocks their one full-block set fits no
# 64-row activation tile in 3 stages, so there was no config at all above 64 rows before session 14)
_WIDE = [(64, 4, 2, 0), (64, 4, 3, 0), (128, 8, 2, 0), (32, 2, 2, 0)]


def wa_configs(wl: WALayoutExt, m: int, sms: int = 132) -> list[Choice]:
    """The choices that need only the "wa" repack for ``m`` rows: "wa" configs (BCQ: ``q`` bits a weight in blocks of
    ``16 j`` inputs, i.e. :func:`.dispatch.wa_candidates`' ``8 (2 j)``; no half-block configs; never none: the
    smallest tiles fit any block), and for 64+ rows "dequant" (the repack decoded to the activation dtype, then
    cuBLAS: :func:`wa_ext_dequant`)."""
    bits, j = (wl.q, 2 * wl.j) if isinstance(wl, BCQWALayout) else (4, wl.j)
    out = [("wa", c[:5]) for c in wa_candidates(wl.n, wl.k, bits, j, m, sms, wide=_WIDE) if not c[5]]
    bm = 32 if m > 32 else 8
    out = out or [("wa", (bm, 64, 1, 4, 2)), ("wa", (bm, 32, 1, 2, 1))]
    return out + [("dequant", ())] if m >= 64 else out


def wa_ext_dequant(wl: WALayoutExt, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``W [N, K]`` in ``dtype`` (bf16 / fp16) from a "wa" repack: ``decode()`` rounded once."""
    ops = _ops()
    if isinstance(wl, BCQWALayout):
        return ops.bcq_wa_dequant(wl.planes, wl.a2, wl.c, wl.meta(), dtype)
    return ops.fp4_wa_dequant(wl.q, wl.sc, wl.meta(), wl.post, dtype)


def run_wa_ext(wl: WALayoutExt, x2d: torch.Tensor, choice: Choice, out_dtype: torch.dtype) -> torch.Tensor:
    """One of :func:`wa_configs`' choices: a "wa" launch, or "dequant" then cuBLAS (the weights rounded to the
    activation dtype, as the "reference" path rounds them)."""
    if choice[0] == "dequant":
        return torch.nn.functional.linear(x2d, wa_ext_dequant(wl, x2d.dtype)).to(out_dtype)
    return wa_ext_mm(wl, x2d, choice[1], out_dtype)


def standalone_wa(cw: CompressedWeight) -> WALayoutExt | None:
    """The "wa" repack that runs ``cw``'s kernel calls without its stored tensors (``CompressedLinear.
    prepare_kernels``): an MXFP4 / NVFP4 / BCQ weight whose "wa" takes both bf16 and fp16 activations on its device
    (self-check passed there; MX: exponents in range for both); else None."""
    if wa_ext_reason(cw) is not None:
        return None
    if not all(wa_ext_ok(cw, dt, cw.device) for dt in (torch.bfloat16, torch.float16)):
        return None
    return wa_ext(cw)


def wa_layout_linear(wl: WALayoutExt, x: torch.Tensor, bias: torch.Tensor | None = None, *,
                     choice: Choice | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` from a "wa" repack alone (a prepared module: the stored weight is in host memory). The
    config is timed among :func:`wa_configs` once per (repack shape, batch bucket, dtype, device)."""
    x2d = x.reshape(-1, x.shape[-1])
    out_dtype = out_dtype or x.dtype
    y = run_wa_ext(wl, x2d, choice or wa_choice(wl, x2d), out_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], wl.n)


def wa_choice(wl: WALayoutExt, x2d: torch.Tensor) -> Choice:
    """The choice among :func:`wa_configs` for ``x2d``, timed once per (repack shape, batch bucket, dtype, device);
    without timing (CPU, or inside a CUDA-graph capture) the first config."""
    bucket = _pow2(x2d.shape[0])
    key = wl.key() + ("alone", bucket, x2d.dtype, x2d.device)
    choice = _TUNED.get(key)
    if choice is None:
        if x2d.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return wa_configs(wl, bucket)[0]
        choice = _TUNED[key] = _tune_wa(wl, bucket, x2d.dtype, x2d.device)
    return choice


def _tune_wa(wl: WALayoutExt, m: int, dtype: torch.dtype, device: torch.device) -> Choice:
    cands = wa_configs(wl, m, torch.cuda.get_device_properties(device).multi_processor_count)
    x = torch.randn(m, wl.k, device=device, dtype=dtype)
    return _fastest(cands, lambda c: run_wa_ext(wl, x, c, dtype)) or cands[0]


def _self_check_weight(kind: str, device: torch.device) -> CompressedWeight:
    from ..formats import parse_format
    from ..formats.bcq import quantize_bcq
    from ..formats.mx import quantize_mx, quantize_nvfp4

    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(96, 2048, device=device, generator=g) * 0.02
    if kind == "bcq":
        return quantize_bcq(w, parse_format("bcq3:g128"), rounds=2)
    return quantize_nvfp4(w, parse_format("nvfp4")) if kind == "nvfp4" else quantize_mx(w, parse_format("mxfp4"))


def wa_ext_verified(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Once per (MXFP4 / NVFP4 / BCQ, device, dtype): does "wa" (inline PTX the CPU tests cannot run) match ``x @
    decode()^T`` in fp32 on a small problem with a poisoned output, split-K and 16-bit output included, and does the
    repack's "dequant" path (within its 4e-3: bf16 weights)? If not, neither is ever picked (logged), so a
    miscompiled bit trick costs speed, never results."""
    key = (kind, str(device), dtype)
    ok = _WAEXT_CHECKED.get(key)
    if ok is None:
        from .reference import reference_fp32, relative_error

        err = float("inf")
        try:
            w = _self_check_weight(kind, device)
            wl = wa_ext(w)
            x = torch.randn(5, 2048, device=device, generator=torch.Generator(device=device).manual_seed(1))
            x = x.to(dtype)
            ref = reference_fp32(w, x)
            out = torch.full((5, 96), float("nan"), device=device)
            launch_wa_ext(wl, x, [16, 64, 1, 4, 3], out)
            blocks = wl.k // ((16 if isinstance(wl, BCQWALayout) else 8) * wl.j)
            y = wa_ext_mm(wl, x, [8, 64, min(2, blocks), 4, 3], dtype)  # serial split-K where there are 2 blocks
            yd = run_wa_ext(wl, x, ("dequant", ()), torch.float32)  # the repack's dequantizer (bf16 weights)
            err = max(relative_error(out, ref), relative_error(y.float(), ref) / 4, relative_error(yd, ref) / 4)
        except Exception as e:  # compiler or launch failure
            log.warning("%s wa kernel unavailable on %s: %s", kind, device, e)
        ok = err <= 1e-3
        if not ok:
            log.warning("%s wa kernel failed its self-check on %s (%s, rel err %.2e); not used", kind, device, dtype,
                        err)
        _WAEXT_CHECKED[key] = ok
    return ok


def _bks(k: int, ok) -> list[int]:
    return [b for b in (256, 128, 64, 32, 16) if k % b == 0 and ok(b)]


def candidates(cw: CompressedWeight, lay, m: int, dtype: torch.dtype, sms: int = 132,
               device: torch.device | None = None) -> list[Choice]:
    """Correct (path, config) choices for ``m`` rows, best guess first; config = (BM, BN, BK, SPLIT_K, warps,
    stages), for "wa" (BM, BN, SPLIT_K, warps, stages)."""
    from .ops_ext import float_bk_ok

    n, k = lay.n, lay.k
    out: list[Choice] = []
    if isinstance(lay, (FloatKernelLayout, BCQKernelLayout)) and wa_ext_ok(cw, dtype, device):
        out += wa_configs(wa_ext(cw), m, sms)
    bm = min(max(16, _pow2(m)), 128)
    if isinstance(lay, FloatKernelLayout):
        one, one_ok = "gemv", (lambda b: b >= 32 and float_bk_ok("gemv", lay.meta(), b, dtype))
        many_ok = (lambda b: float_bk_ok("gemm", lay.meta(), b, dtype))
    elif isinstance(lay, BCQKernelLayout):
        one, one_ok = "lut", (lambda b: b >= 32)
        many_ok = (lambda b: b >= 32 and lay.group % b == 0)
    else:
        assert isinstance(lay, Sparse24KernelLayout)
        one, one_ok = "gemv", (lambda b: b >= 32 and lay.group % b == 0)
        many_ok = one_ok
    one_bks, many_bks = _bks(k, one_ok), _bks(k, many_ok)
    if m <= 16 and one_bks:
        for bn, bk, warps in ((128, 256, 8), (64, 128, 4)):  # few configs: each is a compile on first use
            bk = next((b for b in one_bks if b <= bk), one_bks[-1])
            for split in _splits(k // bk, m * -(-n // bn), sms)[:2]:
                c = (one, (1, bn, bk, split, warps, 3))
                if c not in out:
                    out.append(c)
    if (m >= 2 or isinstance(lay, BCQKernelLayout)) and many_bks:
        for bn, bk, warps, stages in ((64, 128, 4, 4), (128, 64, 4, 4)):
            bk = next((b for b in many_bks if b <= bk), many_bks[-1])
            tiles = -(-m // bm) * -(-n // bn)
            for split in _splits(k // bk, tiles, sms)[:2]:
                c = ("gemm", (bm, bn, bk, split, warps, stages))
                if c not in out:
                    out.append(c)
    if isinstance(lay, Sparse24KernelLayout) and cw.inner.perm is None:  # type: ignore[attr-defined]
        out.append(("dense", ()))
    if (m >= 64 or not out) and ("dequant", ()) not in out:  # "dequant" is "reference" from the repack, faster
        out.append(("reference", ()))
    return out


def run_choice(choice: Choice, cw: CompressedWeight, lay, x2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    path, config = choice
    if path == "reference":
        return reference_linear(cw, x2d).to(out_dtype)
    if path == "dense":
        from .dispatch import layout_linear

        return layout_linear(dense_layout(cw), None, x2d, out_dtype=out_dtype)
    ops = _ops()
    assert ops is not None
    if path in ("wa", "dequant"):
        return run_wa_ext(wa_ext(cw), x2d, choice, out_dtype)
    cfg = list(config)
    if isinstance(lay, FloatKernelLayout):
        return ops.float_mm(x2d, lay.q, lay.scales, lay.global_scale, lay.meta(), path, cfg, out_dtype)
    if isinstance(lay, BCQKernelLayout):
        return ops.bcq_mm(x2d, lay.planes, lay.alphas, lay.offsets, lay.meta(), path, cfg, out_dtype)
    inner = lay.inner
    return ops.sparse24_mm(x2d, inner.qa, lay.idx, inner.scales, inner.zeros, lay.meta(), path, cfg, out_dtype)


def repack_only(cw: CompressedWeight, x2d: torch.Tensor) -> bool:
    """Does ``cw`` run from its "wa" repack alone here, with no other kernel layout built? MXFP4 whose "wa" runs for
    this dtype and device: "wa" was the tuner's choice at every key measured on the H100 (four shapes at 1 and 16
    rows, sessions 12-13; 1-256 rows on 4096x14336, sessions 14-15), so its ``gemv`` / ``gemm`` layout would only hold
    GPU memory (the module then holds 8.5 bits a weight, not 12.75: measured in session 15). Its many-row candidates
    are then "wa" and "dequant", both from the repack. NVFP4 (its GEMV wins at 1 row) and BCQ (LUT-GEMM on one shape) keep every path."""
    from ..formats.mx import MXFPWeight

    return isinstance(cw, MXFPWeight) and wa_ext_ok(cw, x2d.dtype, x2d.device)


def runtime_choice(cw: CompressedWeight, x2d: torch.Tensor) -> Choice:
    """The (path, config) :func:`ext_linear` runs for ``x2d`` (tuning it on first use)."""
    if repack_only(cw, x2d):
        return wa_choice(wa_ext(cw), x2d)
    return tuned_choice(cw, layout(cw), x2d)


def ext_linear(cw: CompressedWeight, x: torch.Tensor, bias: torch.Tensor | None = None, *,
               choice: Choice | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The kernel path for a float/BCQ/2:4 weight (``choice`` forces a path; tests and benchmarks use it)."""
    assert ext_reason(cw) is None, ext_reason(cw)
    x2d = x.reshape(-1, x.shape[-1])
    if choice is None and repack_only(cw, x2d):
        return wa_layout_linear(wa_ext(cw), x, bias, out_dtype=out_dtype)
    lay = layout(cw)
    out_dtype = out_dtype or x.dtype
    if choice is None:
        choice = tuned_choice(cw, lay, x2d)
    y = run_choice(choice, cw, lay, x2d, out_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], lay.n)


def tuned_choice(cw: CompressedWeight, lay, x2d: torch.Tensor) -> Choice:
    bucket = _pow2(x2d.shape[0])
    if x2d.device.type != "cuda":  # the interpreter: no timing, first candidate
        return candidates(cw, lay, bucket, x2d.dtype)[0]
    key = lay.key() + (bucket, x2d.dtype, x2d.device, wa_ext_ok(cw, x2d.dtype, x2d.device))
    hit = _TUNED.get(key)
    if hit is None:
        if torch.cuda.is_current_stream_capturing():
            return candidates(cw, lay, bucket, x2d.dtype, device=x2d.device)[0]
        hit = tune(cw, lay, bucket, x2d.dtype, x2d.device)
        _TUNED[key] = hit
    return hit


def tune(cw: CompressedWeight, lay, m: int, dtype: torch.dtype, device: torch.device | str = "cuda") -> Choice:
    """Time every candidate for ``m`` rows (median of CUDA-graph replays) and return the fastest."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    x = torch.randn(m, lay.k, device=device, dtype=dtype)
    best = _fastest(candidates(cw, lay, m, dtype, sms, torch.device(device)),
                    lambda c: run_choice(c, cw, lay, x, dtype))
    if best is None:
        return ("reference", ())
    log.debug("tuned %s m=%d: %s", lay.key(), m, best)
    return best


def _fastest(cands: list[Choice], run) -> Choice | None:
    """The candidate whose ``run(c)`` replays fastest; configs the compiler rejects are skipped (None: all were)."""
    best: tuple[float, Choice] | None = None
    for c in cands:
        try:
            ms = time_graph(lambda: run(c))
        except Exception as e:  # a config the compiler rejects is skipped, not fatal
            log.debug("candidate %s failed: %s", c, e)
            continue
        if best is None or ms < best[0]:
            best = (ms, c)
    return None if best is None else best[1]
