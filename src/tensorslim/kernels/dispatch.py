"""Choose how a compressed weight multiplies: a Triton kernel on CUDA where one fits, else the reference.

``linear(cw, x, bias)`` is what ``CompressedWeight.linear`` calls for CUDA activations. Paths:
- ``IntGroupWeight`` (1-6 and 8 bits, ``in % 32 == 0``, fp16/bf16 activations): "gemv" (1-16 rows, one row a
  program, CUDA cores, optional split-K), "wa" (int4, int3 and int2, ``in % 256 == 0``, power-of-two groups of 32
  or more: the weights as the tensor cores' A operand from registers, :mod:`.triton.wa`, any batch; its own repacked
  layout, memoized with the integer layout), "mma4" (int4 with groups >= 128: tensor cores on bit-trick operands,
  any batch), "gemm" (tensor-core tiles for the other widths, optional split-K), "gemmp" (tensor-core tiles for
  single-plane codes, one dot per code position, no reshape of the unpacked codes) or "dequant" (dequantize to the
  activation dtype, then cuBLAS; 64 rows or more);
- ``TernaryWeight``: the same kernels (2-bit codes ``t + 1``, zero point 1; :func:`.layout.ternary_layout`);
- ``SumWeight(IntGroupWeight | TernaryWeight, LowRankWeight)``: the same kernels with the low-rank term fused into
  their epilogue (``t = x V^T`` first, a ``[M, r]`` fp32 product, then one pass over ``y``);
- ``FP8Weight``, ``MXFPWeight``, ``NVFP4Weight``, ``BCQWeight`` and 2:4 ``SparseWeight`` with an inner int4:
  :mod:`.dispatch_ext` (its own kernels, candidates and memo);
- anything else, CPU tensors, fp32 activations or a missing Triton: :func:`.reference.reference_linear`.

Which path and tile config run is *measured*, not guessed: the first call for a (shape, format, batch bucket, dtype,
device) key times the candidate configs in CUDA-graph replays (median; GPU time, no Python overhead) and keeps the
fastest in ``_TUNED`` (a per-process memo, like Triton's autotuner; batch buckets are powers of two). Kernel layouts
(views or one-time repacks of the stored tensors, :mod:`.layout`) are memoized per weight object (weak keys: they go
away with the weight; moving a ``CompressedLinear`` makes a new weight object and so a new layout): a model's own
calls use :func:`runtime_layout` (``_RUNTIME``; only the "wa" repack where "wa" runs the weight), forced choices the
full :func:`layout` (``_LAYOUTS``). Neither memo changes results: every candidate is a correct path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch

from ..formats.base import CompressedWeight
from ..formats.intgroup import IntGroupWeight
from .layout import (
    WALayout, IntKernelLayout, int_layout, int_layout_reason, layout_decode, ternary_layout, ternary_layout_reason,
    wa_block_words, wa_layout, wa_reason,
)
from .reference import reference_linear

log = logging.getLogger(__name__)

Choice = tuple[str, tuple[int, ...]]
_LAYOUTS: "weakref.WeakKeyDictionary[CompressedWeight, Any]" = weakref.WeakKeyDictionary()
_VPARTS: "weakref.WeakKeyDictionary[CompressedWeight, tuple[torch.dtype, torch.Tensor | None, torch.Tensor]]" = \
    weakref.WeakKeyDictionary()
_WA: "weakref.WeakKeyDictionary[IntKernelLayout, WALayout]" = weakref.WeakKeyDictionary()
_RUNTIME: "weakref.WeakKeyDictionary[CompressedWeight, IntKernelLayout]" = weakref.WeakKeyDictionary()
_TUNED: dict[tuple, Choice] = {}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@lru_cache(maxsize=1)
def _ops() -> ModuleType | None:
    try:
        from . import ops
    except ImportError as e:  # no triton: every call takes the reference path
        log.info("Triton kernels unavailable (%s); using reference multiplies", e)
        return None
    return ops


def _lowrank_type() -> type | None:
    try:
        from ..formats.lowrank import LowRankWeight
    except ImportError:
        return None
    return LowRankWeight


def _ternary_type() -> type | None:
    try:
        from ..formats.ternary import TernaryWeight
    except ImportError:
        return None
    return TernaryWeight


def _is_int_like(cw: CompressedWeight) -> bool:
    tern = _ternary_type()
    return isinstance(cw, IntGroupWeight) or (tern is not None and isinstance(cw, tern))


# -- what runs -----------------------------------------------------------------------------------------------------
def kernel_reason(cw: CompressedWeight, x: torch.Tensor | None = None) -> str | None:
    """``None`` if a kernel can run ``cw`` (for ``x``), else why the reference path runs."""
    reason = None if x is None else activation_reason(x)
    if reason is not None:
        return reason
    base = _int_part(cw)
    if base is None:  # float, binary-coded and 2:4 sparse formats: :mod:`.dispatch_ext`
        from .dispatch_ext import ext_reason

        return ext_reason(cw)
    reason = int_layout_reason(base) if isinstance(base, IntGroupWeight) else ternary_layout_reason(base)
    if reason is None and _ops() is None:
        reason = "triton is not installed"
    return reason


def activation_reason(x: torch.Tensor) -> str | None:
    """``None`` if the kernels take activations like ``x``, else why not."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"activation dtype {x.dtype} (kernels take float16/bfloat16)"
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "activations are not on a CUDA device"
    return None


def _int_part(cw: CompressedWeight) -> CompressedWeight | None:
    """The part the integer kernels run: the weight itself (IntGroup, Ternary) or the base of Sum(that, LowRank)."""
    if _is_int_like(cw):
        return cw
    lr = _lowrank_type()
    base, extra = getattr(cw, "base", None), getattr(cw, "extra", None)
    if lr is not None and base is not None and _is_int_like(base) and isinstance(extra, lr):
        return base
    return None


def linear(cw: CompressedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` by the fastest correct path for (format, device, batch)."""
    if kernel_reason(cw, x) is not None:
        return reference_linear(cw, x, bias)
    return kernel_linear(cw, x, bias)


def kernel_linear(cw: CompressedWeight, x: torch.Tensor, bias: torch.Tensor | None = None, *,
                  choice: Choice | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run the kernel path (``choice`` forces a path/config; tests and benchmarks use it). No reference fallback."""
    base = _int_part(cw)
    if base is None:
        from .dispatch_ext import ext_linear

        return ext_linear(cw, x, bias, choice=choice, out_dtype=out_dtype)
    assert base is not None, kernel_reason(cw, x)
    lay = layout(base) if choice is not None else runtime_layout(base)
    return layout_linear(lay, cw.extra if base is not cw else None, x, bias,  # type: ignore[attr-defined]
                         choice=choice, out_dtype=out_dtype)


def layout_linear(lay: IntKernelLayout, extra: CompressedWeight | None, x: torch.Tensor,
                  bias: torch.Tensor | None = None, *, choice: Choice | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ W^T (+ the low-rank term extra) + bias`` from a kernel layout alone (:func:`kernel_linear`, and
    ``CompressedLinear.prepare_kernels``, whose stored codes are no longer on the GPU)."""
    x2d = x.reshape(-1, x.shape[-1])
    lr = None
    if extra is not None:  # (V as exact parts in the kernels' input order, U [N, r])
        lr = (v_parts(extra, x2d.dtype, lay.perm), extra.u)  # type: ignore[attr-defined]
    if lay.perm is not None:
        x2d = x2d.index_select(1, lay.perm.to(x2d.device))
    out_dtype = out_dtype or x.dtype
    if choice is None:
        choice = tuned_choice(lay, x2d, None if lr is None else lr[1].shape[1])
    y = run_choice(choice, lay, x2d, lr, out_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], lay.n)


def v_parts(extra: CompressedWeight, dtype: torch.dtype, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``V [r, in]`` of a low-rank term as ``[P <= 3, r, in]`` parts in ``dtype`` whose sum is ``V`` (exactly where
    mantissa and exponent range fit: fp16 factors with bf16 activations are 2 parts, fp32 with bf16 3, fp16 with
    fp16 1; fp32 with fp16 loses remainders below fp16's range, ~1e-8 relative), so
    that :func:`.ops.lowrank_t` runs tensor-core dots with exact products. ``perm``: the inputs in the kernel
    layout's order (act-order: the kernels see ``x[:, perm]``, so the parts are ``V[:, perm]``). Memoized per
    (weight, dtype, permutation tensor)."""
    hit = _VPARTS.get(extra)
    if hit is not None and hit[0] == dtype and hit[1] is perm:
        return hit[2]
    v = extra.v.double()  # type: ignore[attr-defined]
    parts, rest = [], v
    for _ in range(3):
        p = rest.to(dtype)
        parts.append(p)
        rest = rest - p.double()
        if not rest.any():
            break
    out = torch.stack(parts)
    if perm is not None:
        out = out.index_select(2, perm.to(out.device)).contiguous()
    _VPARTS[extra] = (dtype, perm, out)
    return out


def _full_layout(base: CompressedWeight) -> IntKernelLayout:
    return int_layout(base) if isinstance(base, IntGroupWeight) else ternary_layout(base)


def layout(base: CompressedWeight) -> IntKernelLayout:
    lay = _LAYOUTS.get(base)
    if lay is None:
        lay = _full_layout(base)
        _LAYOUTS[base] = lay
    return lay


def runtime_layout(base: CompressedWeight) -> IntKernelLayout:
    """The layout the dispatcher keeps for a weight's own calls (:func:`kernel_linear` without a forced choice).

    Where "wa" runs the weight (2-, 3- and 4-bit codes and ternary whose blocks fit; it won every tuned key of the
    issue shapes at 1-128 rows on the H100) and passed its self-check on the device (:func:`_wa_trusted`), only its
    repack is kept: the transposed words are built, repacked and
    dropped, and the returned layout has ``qa = None`` (its candidates are "wa" and, for 64+ rows, "dequant" from the
    repack). So the GPU holds one kernel copy of the codes, not two. Otherwise :func:`layout`. Memoized per weight
    object (weak keys). Forced choices (tests, benchmarks) use :func:`layout`, which offers every path."""
    lay = _RUNTIME.get(base)
    if lay is None:
        full = _LAYOUTS.get(base) or _full_layout(base)
        if wa_reason(full) is None and _wa_trusted(full):
            wl = _WA.get(full) or wa_layout(full)
            lay = dataclasses.replace(full, qa=None, qb=None, scales=None, zeros=None)
            _WA[lay] = wl
        else:
            lay = layout(base)
        _RUNTIME[base] = lay
    return lay


def standalone_layout(cw: CompressedWeight) -> tuple[IntKernelLayout, CompressedWeight | None] | None:
    """``(runtime layout, low-rank term or None)`` that run ``cw``'s kernel calls without its stored tensors (a "wa"
    repack; a 2:4 + int4 weight's as its equal dense int4 weight), for ``CompressedLinear.prepare_kernels``; None
    where the kernels need the stored weight (other formats, or no "wa" repack)."""
    base = _int_part(cw)
    if base is None:
        from ..formats.sparse import SparseWeight

        if not isinstance(cw, SparseWeight) or kernel_reason(cw) is not None:  # only 2:4 + int4 has a kernel
            return None
        from .dispatch_ext import dense_layout

        lay = dense_layout(cw)
    else:
        lay = runtime_layout(base)
    if lay is None or lay.qa is not None:
        return None
    return lay, (cw.extra if base is not None and base is not cw else None)  # type: ignore[attr-defined]


def _wa_trusted(lay: IntKernelLayout) -> bool:
    """Whether "wa" and the dequantizer of its repack passed their self-check (:func:`kernel_verified`) for both
    activation dtypes on the layout's device. Only then does :func:`runtime_layout` drop the transposed layout, which
    the other paths need. Off CUDA (the interpreter) there is nothing to check; inside a CUDA-graph capture only an
    earlier check counts."""
    dev = lay.qa.device  # type: ignore[union-attr]
    if dev.type != "cuda":
        return True
    if torch.cuda.is_current_stream_capturing():
        return all(_CHECKED.get(("wa", lay.bits, str(dev), dt), False) for dt in _KERNEL_DTYPES)
    return all(kernel_verified("wa", lay.bits, dev, dt) for dt in _KERNEL_DTYPES)


def keep_wa(lay: IntKernelLayout, wl: WALayout) -> None:
    """Make ``wl`` the "wa" repack of the runtime layout ``lay`` (a module that holds both, deep-copied or unpickled,
    has layout objects this process's memo has not seen)."""
    if _WA.get(lay) is not wl:
        _WA[lay] = wl


def wa_meta(wl: WALayout) -> list[int]:
    """``meta`` of :func:`.ops.launch_wa` for a weights-as-A layout."""
    return [wl.k, wl.group, int(wl.symmetric), wl.j, wl.bits]


def wa_of(lay: IntKernelLayout) -> WALayout:
    """The weights-as-A layout of a 2-, 3- or 4-bit kernel layout, repacked once and memoized with it."""
    wl = _WA.get(lay)
    if wl is None:
        wl = wa_layout(lay)
        _WA[lay] = wl
    return wl


def run_choice(choice: Choice, lay: IntKernelLayout, x2d: torch.Tensor, lr: tuple[torch.Tensor, torch.Tensor] | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """One path/config; ``lr = (vp, u)``: the low-rank term's ``V`` as exact parts in the kernels' input order
    (:func:`v_parts`) and ``U [N, r]``. "wa" computes ``t = x V^T`` itself (:func:`.ops.wa_mm`); the other paths
    take ``t`` from :func:`.ops.lowrank_t`."""
    ops = _ops()
    assert ops is not None
    path, config = choice
    if path == "wa":
        wl = wa_of(lay)
        vp, u = lr if lr is not None else (None, None)
        return ops.wa_mm(x2d, wl.q, wl.scales, wl.zeros, vp, u, wa_meta(wl), list(config), out_dtype)
    meta = [lay.k, lay.bits, lay.bits_a, lay.bits_b, lay.group, int(lay.symmetric)]
    t, u = (ops.lowrank_t(x2d, lr[0]).sum(0), lr[1]) if lr is not None else (None, None)
    if path == "dequant":
        if lay.qa is None:  # only the weights-as-A repack is kept (runtime_layout)
            wl = wa_of(lay)
            y = torch.nn.functional.linear(x2d, ops.wa_dequant(wl.q, wl.scales, wl.zeros, wa_meta(wl), x2d.dtype))
        else:
            y = x2d @ ops.int_dequant(lay.qa, lay.qb, lay.scales, lay.zeros, meta, x2d.dtype)  # W^T [K, N]
        if t is not None:
            y = y + torch.nn.functional.linear(t, u.float()).to(y.dtype)
        return y.to(out_dtype)
    return ops.int_mm(x2d, lay.qa, lay.qb, lay.scales, lay.zeros, t, u, meta, path, list(config), out_dtype)


# -- candidates and tuning ------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _split(k_tiles: int, programs: int, target: int) -> int:
    """Largest power-of-two split (<= 16) dividing ``k_tiles`` that brings ``programs`` up towards ``target``."""
    s = 1
    while s < 16 and programs * s < target and k_tiles % (2 * s) == 0 and k_tiles // (2 * s) >= 2:
        s *= 2
    return s


def _splits(k_tiles: int, programs: int, sms: int) -> list[int]:
    """Split-K factors worth timing: enough programs for ~2, 4 and 8 per SM, and none. On the H100 the batch-1 GEMV
    of 8192x28672 without a split ran 224 programs, 0.57 waves at its register-limited occupancy, and reached 40% of
    the DRAM bandwidth (Nsight Compute): more, shorter programs balance the SMs at the cost of fp32 atomics."""
    return list(dict.fromkeys([_split(k_tiles, programs, t * sms) for t in (8, 4, 2)] + [1]))


def _mma4_ok(lay: IntKernelLayout) -> bool:
    """The int4 tensor-core kernel takes 4-bit codes in one plane with groups of >= 128 inputs (BK = 128)."""
    return lay.bits == 4 and lay.qb is None and lay.group % 128 == 0 and lay.k % 128 == 0


def candidates(lay: IntKernelLayout, m: int, sms: int = 132) -> list[Choice]:
    """Correct (path, config) choices for ``m`` rows, best guess first.

    config = (BM, BN, BK, SPLIT_K, num_warps, num_stages); BM is unused by "gemv" (one row a program); "wa" takes
    (BM, BN, SPLIT_K, num_warps, num_stages, half) (:func:`wa_candidates`; its block is fixed by the layout). The
    first guesses come from the instruction counts of the sm_90a builds (docs/kernels.md); the "wa" sets from its
    H200 and H100 sweeps (docs/results/kernels.md).
    """
    n, k, g = lay.n, lay.k, lay.group
    if lay.qa is None:  # runtime_layout kept only the weights-as-A repack
        out = [("wa", c) for c in wa_candidates(n, k, lay.bits, wa_block_words(k, g), m, sms)]
        return out + [("dequant", ())] if m >= 64 else out
    bks = [b for b in (128, 64, 32) if g % b == 0 and k % b == 0]
    out: list[Choice] = []
    if m <= 16:
        # gemv tiles may span whole groups (bk > g, bk % g == 0) or lie inside one (bk <= g, g % bk == 0)
        for bn, bk, warps in ((128, 256, 8), (64, 256, 4), (128, 128, 4), (256, 128, 8), (128, 512, 8),
                              (64, 512, 4)):
            if not (k % bk == 0 and (bk % g == 0 or g % bk == 0)):
                bk = next((b for b in bks if b <= bk), bks[-1])
            tiles = m * -(-n // bn)
            for split in _splits(k // bk, tiles, sms):
                c = ("gemv", (1, bn, bk, split, warps, 3))
                if c not in out:
                    out.append(c)
    # Where int4 "wa" runs (in % 256 == 0), "mma4" and "gemmp" are not offered: on the H100 and the H200 "wa" beat
    # them at every batch size and issue shape (session 5), and each costs ~12-18 more compiles and timings a key.
    # 2- and 3-bit "wa" were timed at 1 and 16 rows on one shape only (session 6): the older paths stay offered.
    wa_ok = wa_reason(lay) is None
    measured_wa = wa_ok and lay.bits == 4
    if _mma4_ok(lay) and not measured_wa:
        bm = min(max(16, _pow2(m)), 128)
        for bn, warps, stages in ((128, 4, 4), (64, 4, 4), (256, 8, 3), (128, 8, 3)):
            tiles = -(-m // bm) * -(-n // bn)
            for split in _splits(k // 128, tiles, sms):
                c = ("mma4", (bm, bn, 128, split, warps, stages))
                if c not in out:
                    out.append(c)
    if m >= 2:  # also for int4 >= 16 rows: on the H100 gemm beat mma4 there (48 vs 58 us, 4096x14336, m=16)
        bm = min(max(16, _pow2(m)), 128)
        for bn, bk, warps, stages in ((64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 5),
                                      (256, 64, 8, 3)):
            bk = next((b for b in bks if b <= bk), bks[-1])
            while stages > 2 and stages * (bm * bk * 2 + bk * bn * 4) > 160_000:  # shared memory per pipeline stage
                stages -= 1
            tiles = -(-m // bm) * -(-n // bn)
            for split in _splits(k // bk, tiles, sms)[:2]:
                c = ("gemm", (bm, bn, bk, split, warps, stages))
                if c not in out:
                    out.append(c)
    if m >= 2 and lay.qb is None and not measured_wa:  # one dot per code position: no [BK, BN] reshape of codes
        bm = min(max(16, _pow2(m)), 128)
        pa = 32 // lay.bits_a
        for bk in (b for b in (16 * pa, 32 * pa) if b <= g and g % b == 0 and k % b == 0):
            for bn, warps, stages in ((128, 4, 4), (64, 4, 4), (256, 8, 3)):
                tiles = -(-m // bm) * -(-n // bn)
                for split in _splits(k // bk, tiles, sms)[:2]:
                    c = ("gemmp", (bm, bn, bk, split, warps, stages))
                    if c not in out:
                        out.append(c)
    if wa_ok:  # the weights as the A operand (int4, int3, int2; any batch)
        out += [("wa", c) for c in wa_candidates(n, k, lay.bits, wa_block_words(k, g), m, sms)]
    if m >= 64:
        out.append(("dequant", ()))
    return out


def wa_candidates(n: int, k: int, bits: int, j: int, m: int, sms: int = 132, *,
                  wide: list[tuple[int, ...]] | None = None) -> list[tuple[int, ...]]:
    """"wa" configs ``(BM, BN, SPLIT_K, warps, stages, half)`` for ``m`` rows on blocks of ``8 j`` inputs.
    ``wide``: the ``(BN, warps, stages, half)`` sets for more than 32 rows instead of the integer kernel's (which
    are mostly half-block configs, int4 only).

    BN = 64 with 4 warps runs Hopper's ``wgmma``; BN = 32 or 2 warps run ``mma.sync`` (no async waits), which won at
    1 and 16 rows on some H100 shapes (session 5). ``half`` (int4): half-block iterations, half the shared memory a
    pipeline stage and one live word tile, which is what lets BN = 128-256 with BM = 64-128 fit for 64+ rows, where
    the activations re-read per output tile (``K BM`` a program) dominate the traffic unless BN is large.
    """
    blocks = k // (8 * j)
    if m <= 32:
        bms = [8, 16] if m <= 8 else [min(_pow2(m), 32)]
        sets = [(64, 4, 3, 0), (64, 4, 2, 0), (64, 4, 4, 0), (128, 8, 3, 0), (32, 2, 3, 0), (32, 2, 2, 0),
                (64, 4, 4, 1), (16, 1, 4, 1)]
    else:  # session 6 (H100): BN 128-256 half-block configs won every key at 64 and 128 rows; session 9
        # (`wa_sweep.py --wide`): BN 64 half-block, 1 warpgroup, won 128 rows on 14336x4096 and 28672x8192
        bms = [32, 64] if m <= 64 else [64, 128]
        sets = wide or [(128, 8, 2, 1), (128, 8, 3, 1), (256, 16, 2, 1), (256, 16, 3, 1), (64, 4, 3, 0),
                        (64, 4, 3, 1), (64, 4, 4, 1)]
    out: list[tuple[int, ...]] = []
    for bm in bms:
        for bn, warps, stages, half in sets:
            if half and bits != 4:
                continue
            stage_bytes = bn * j * 4 * bits // 4 // (1 + half) + 8 * j * bm * 2 // (1 + half)  # words + activations
            if stages * stage_bytes > 225_000:  # Hopper: 227 KB a block (a config that does not fit is skipped)
                continue
            tiles = -(-m // bm) * -(-n // bn)
            ok = [s for s in (1, 2, 4, 8, 16) if blocks // s >= 2] or [1]  # uneven splits are fine
            fill = [s for s in ok if tiles * s >= sms]  # the first split that fills the SMs, and twice it
            for split in dict.fromkeys([ok[0]] + fill[:2]):
                out.append((bm, bn, split, warps, stages, half))
    return out


_SELF_CHECKED = ("mma4", "wa")  # paths with inline PTX, which the CPU tests run only in a plain-Triton form
_CHECKED: dict[tuple, bool] = {}


def kernel_verified(path: str, bits: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Once per (path, bits, device, dtype): does a kernel with inline PTX ("mma4", "wa") match ``x @ decode()^T`` in
    fp32 on a small problem with a poisoned output? If not, the dispatcher never picks it (logged), so a miscompiled
    bit trick or a compiler bug costs speed, never results."""
    key = (path, bits, str(device), dtype)
    ok = _CHECKED.get(key)
    if ok is None:
        from ..formats import IntGroup, quantize_rtn
        from .reference import reference_fp32, relative_error

        ops = _ops()
        g = torch.Generator(device=device).manual_seed(0)
        ok = ops is not None
        for sym in (False, True):
            if not ok:
                break
            w = quantize_rtn(torch.randn(96, 512, device=device, generator=g),
                             IntGroup(bits=bits, group_size=128, symmetric=sym))
            lay = layout(w)
            x = torch.randn(5, 512, device=device, generator=g).to(dtype)
            out = torch.full((5, 96), float("nan"), device=device)
            try:
                if path == "mma4":
                    meta = [lay.k, lay.bits, lay.bits_a, lay.bits_b, lay.group, int(lay.symmetric)]
                    ops.launch_int_mm(x, lay.qa, lay.qb, lay.scales, lay.zeros, None, None, meta, "mma4",
                                      [16, 64, 128, 1, 4, 3], out)
                else:  # and the dequantizer of its repack (the same unpacking), which runtime layouts use
                    wl = wa_of(lay)
                    ops.launch_wa(x, wl.q, wl.scales, wl.zeros, None, None, wa_meta(wl), [16, 64, 1, 4, 3], out)
                    dense = torch.full((96, 512), float("nan"), device=device, dtype=dtype)
                    ops.launch_wa_dequant(wl.q, wl.scales, wl.zeros, wa_meta(wl), dense)
                    err_w = relative_error(dense.float(), layout_decode(lay).to(dtype).float())
                err = relative_error(out, reference_fp32(w, x))
                if path == "wa":
                    err = max(err, err_w)
            except Exception as e:  # compiler or launch failure
                log.warning("%s kernel (int%d) unavailable on %s: %s", path, bits, device, e)
                err = float("inf")
            ok = err <= 1e-3
            if not ok:
                log.warning("%s kernel (int%d) failed its self-check on %s (%s, rel err %.2e); not used",
                            path, bits, device, dtype, err)
        _CHECKED[key] = ok
    return ok


def usable_candidates(lay: IntKernelLayout, m: int, x2d: torch.Tensor, sms: int = 132) -> list[Choice]:
    """:func:`candidates` less the paths whose self-check failed (:func:`kernel_verified`; inside a CUDA-graph capture,
    where the check cannot run, such a path stays only if it already passed)."""
    cands = candidates(lay, m, sms)
    if x2d.device.type == "cuda":
        for path in _SELF_CHECKED:
            if not any(c[0] == path for c in cands):
                continue
            if torch.cuda.is_current_stream_capturing():
                ok = _CHECKED.get((path, lay.bits, str(x2d.device), x2d.dtype), False)
            else:
                ok = kernel_verified(path, lay.bits, x2d.device, x2d.dtype)
            if not ok:
                cands = [c for c in cands if c[0] != path] or [("dequant", ())]
    return cands


def tuned_choice(lay: IntKernelLayout, x2d: torch.Tensor, rank: int | None) -> Choice:
    m = x2d.shape[0]
    bucket = _pow2(m)
    if x2d.device.type != "cuda":  # the interpreter: no timing, first candidate
        return candidates(lay, bucket)[0]
    key = (lay.n, lay.k, lay.bits, lay.group, lay.symmetric, lay.qb is not None, lay.qa is None, bucket, x2d.dtype,
           rank, x2d.device)
    hit = _TUNED.get(key)
    if hit is None:
        if torch.cuda.is_current_stream_capturing():  # cannot time inside a capture: a safe default, not remembered
            return usable_candidates(lay, bucket, x2d)[0]
        hit = tune(lay, bucket, x2d.dtype, rank, x2d.device)
        _TUNED[key] = hit
    return hit


def _cold_copies(lay: IntKernelLayout, l2_bytes: int) -> list[IntKernelLayout]:
    """The layout plus copies of its tensors, together over twice the L2 cache, so that timing a rotation through
    them reads the weights from DRAM as a model's forward pass does (a layer that fits in L2 would otherwise be timed
    hot, and the tuner picked configs for the wrong regime). Layers over twice L2 are timed as they are."""
    wl = wa_of(lay) if lay.qa is None else None  # runtime_layout: the repack is what runs
    held = (lay.qa, lay.qb, lay.scales, lay.zeros) if wl is None else (wl.q, wl.scales, wl.zeros)
    nbytes = sum(t.numel() * t.element_size() for t in held if t is not None)
    n = min(16, -(-2 * l2_bytes // max(nbytes, 1)))

    def clone(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.clone()

    def copy() -> IntKernelLayout:
        if wl is None:
            return dataclasses.replace(lay, qa=lay.qa.clone(), qb=clone(lay.qb), scales=lay.scales.clone(),
                                       zeros=clone(lay.zeros))
        c = dataclasses.replace(lay)
        _WA[c] = dataclasses.replace(wl, q=wl.q.clone(), scales=wl.scales.clone(), zeros=clone(wl.zeros))
        return c

    return [lay] + [copy() for _ in range(n - 1)]


def time_graph(fn, calls: int = 8, reps: int = 5, per: int = 1, warm_s: float = 0.0) -> float:
    """Milliseconds per kernel call of ``fn`` (which makes ``per`` calls) replayed in a CUDA graph (GPU time without
    Python or launch overhead), after ``warm_s`` seconds of replays (:func:`warm_clocks`)."""
    fn()  # compile
    g = torch.cuda.CUDAGraph()
    capture = torch.cuda.graph(g)
    s = capture.capture_stream  # warm up on the stream that captures: what it sets up (e.g. split-K scratch) is there
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with capture:
        for _ in range(calls):
            fn()
    g.replay()
    warm_clocks(g.replay, warm_s)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / (calls * per))
    return sorted(times)[reps // 2]


def warm_clocks(replay, seconds: float) -> None:
    """Run ``replay`` until the GPU has been busy for ``seconds``. Its clocks rise over a fraction of a second of
    load, so what is timed first after idle (model building, weight copies) reads slow: cuBLAS bf16 on 8192x28672 at
    batch 1 measured 194 us first and 163 us right after, in one process on an H100 (session 8)."""
    import time

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        replay()
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def tune(lay: IntKernelLayout, m: int, dtype: torch.dtype, rank: int | None = None,
         device: torch.device | str = "cuda", warm_each: float = 0.0, reps: int = 5,
         timings: list | None = None) -> Choice:
    """Time every candidate for ``m`` rows (median of ``reps`` CUDA-graph replays) and return the fastest.

    Runs on the first call for a key, so call a model once before capturing it in a CUDA graph yourself.
    ``warm_each``: seconds of replays before timing each candidate after the first (which always gets 0.2 s);
    ``timings``: if given, receives ``(ms, choice)`` for every candidate timed (``bench/tune_noise.py``).
    """
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    x = torch.randn(m, lay.k, device=device, dtype=dtype)
    copies = _cold_copies(lay, getattr(props, "L2_cache_size", 50 << 20))
    lr = None
    if rank is not None:  # V in two parts (fp16 factors, bf16 activations), U: every path computes t = x V^T too
        lr = (torch.randn(2, rank, lay.k, device=device, dtype=dtype),
              torch.randn(lay.n, rank, device=device, dtype=torch.float16))
    best: tuple[float, Choice] | None = None
    for i, c in enumerate(usable_candidates(lay, m, x, sms)):
        try:  # the first candidate after 0.2 s of load, so that it is not timed at idle clocks
            ms = time_graph(lambda: [run_choice(c, L, x, lr, dtype) for L in copies], calls=max(1, 8 // len(copies)),
                             per=len(copies), warm_s=0.2 if i == 0 else warm_each, reps=reps)
        except Exception as e:  # a config the compiler rejects (e.g. shared memory) is skipped, not fatal
            log.debug("candidate %s failed: %s", c, e)
            continue
        if timings is not None:
            timings.append((ms, c))
        if best is None or ms < best[0]:
            best = (ms, c)
    if best is None:
        return ("dequant", ())
    log.debug("tuned %dx%d int%d g%d m=%d: %s (%.1f us)", lay.n, lay.k, lay.bits, lay.group, m, best[1], best[0] * 1e3)
    return best[1]
