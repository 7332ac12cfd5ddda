"""Triton kernels (under the interpreter, on CPU) against ``x @ decode()^T`` in fp32, with poisoned outputs.

Activations are fp16 for the tensor-core path (the interpreter mishandles bf16 ``tl.dot``; on the GPU the bench
checks bf16) and bf16 for the GEMV path; outputs are fp32 so the bound (1e-3) measures the kernel, not the final
rounding. Output rows and columns are not multiples of the tiles (poison catches unwritten elements).
"""

from __future__ import annotations

import pytest
import torch

from tensorslim.formats import IntGroup, SumWeight, parse_format, quantize_rtn
from tensorslim.formats.lowrank import LowRank, LowRankWeight
from tensorslim.formats.ternary import Ternary, quantize_ternary
from tensorslim.kernels import dispatch
from tensorslim.kernels.layout import layout_decode
from tensorslim.kernels.reference import reference_fp32, relative_error

TOL = 1e-3
N, K = 40, 256  # 40 outputs: not a multiple of any tile width


def run_poisoned(ops, cw, x, path, config):
    """One launch into a NaN-poisoned (or, for split-K, zeroed) fp32 buffer."""
    base = dispatch._int_part(cw)
    lay = dispatch.layout(base)
    x2d = x if lay.perm is None else x.index_select(1, lay.perm)
    lr = (None, None)
    if base is not cw:
        lr = (torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), cw.extra.v.float()), cw.extra.u)
    meta = [lay.k, lay.bits, lay.bits_a, lay.bits_b, lay.group, int(lay.symmetric)]
    split = config[2] if path == "wa" else config[3]
    out = torch.zeros(x.shape[0], lay.n) if split > 1 else torch.full((x.shape[0], lay.n), float("nan"))
    if path == "wa":  # the weights-as-A kernel reads its own layout (tests/kernels/test_wa.py)
        wl = dispatch.wa_of(lay)
        ops.launch_wa(x2d.contiguous(), wl.q, wl.scales, wl.zeros, *lr, dispatch.wa_meta(wl),
                           list(config), out)
        return out
    ops.launch_int_mm(x2d.contiguous(), lay.qa, lay.qb, lay.scales, lay.zeros, *lr, meta, path, list(config), out)
    return out


CASES = [  # (bits, group, symmetric)
    (4, 64, False), (4, 32, True), (3, 64, False), (2, 32, True), (8, 128, False), (4, None, True), (6, 64, False),
    (1, 32, False),
]


@pytest.mark.parametrize("bits,group,sym", CASES)
def test_gemv_matches_reference(ops, bits, group, sym, gen):
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=bits, group_size=group, symmetric=sym))
    g = group or K
    for m, config in [(1, (1, 64, min(g, 64), 1, 4, 3)), (3, (1, 32, 32, 4, 4, 3)), (2, (1, 16, min(g, 128), 2, 4, 3))]:
        x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
        err = relative_error(run_poisoned(ops, w, x, "gemv", config), reference_fp32(w, x))
        assert err <= TOL, f"bits={bits} g={group} sym={sym} m={m} {config}: {err:.2e} (seed {gen.seed_})"


@pytest.mark.parametrize("bits,group,sym", CASES)
def test_gemm_matches_reference(ops, bits, group, sym, gen):
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=bits, group_size=group, symmetric=sym))
    g = group or K
    for m, config in [(7, (16, 16, 32, 1, 4, 3)), (33, (16, 32, min(g, 64), 2, 4, 3)), (16, (32, 64, 32, 8, 4, 3))]:
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(run_poisoned(ops, w, x, "gemm", config), reference_fp32(w, x))
        assert err <= TOL, f"bits={bits} g={group} sym={sym} m={m} {config}: {err:.2e} (seed {gen.seed_})"


@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, None, True), (8, 128, False), (8, 64, True),
                                              (2, None, False)])
def test_gemm_planes_matches_reference(ops, bits, group, sym, gen):
    """"gemmp" (single-plane codes, one dot per code position), plain and with the fused low-rank epilogue."""
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=bits, group_size=group, symmetric=sym))
    bk = 16 * (32 // bits)
    for m, config in [(7, (16, 16, bk, 1, 4, 3)), (33, (16, 32, bk, K // bk, 4, 3)), (16, (32, 64, bk, 1, 4, 3))]:
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(run_poisoned(ops, w, x, "gemmp", config), reference_fp32(w, x))
        assert err <= TOL, f"bits={bits} g={group} sym={sym} m={m} {config}: {err:.2e} (seed {gen.seed_})"
    lr = LowRankWeight.from_factors(LowRank(rank=5), torch.randn(N, 5, generator=gen), torch.randn(5, K, generator=gen))
    sw = SumWeight(format=parse_format(f"int{bits}:{'g' + str(group) if group else 'pc'}+lowrank:r5"), shape=(N, K),
                   base=w, extra=lr)
    x = torch.randn(5, K, generator=gen).to(torch.float16)
    err = relative_error(run_poisoned(ops, sw, x, "gemmp", (16, 32, bk, 1, 4, 3)), reference_fp32(sw, x))
    assert err <= TOL, f"sum bits={bits}: {err:.2e} (seed {gen.seed_})"


def test_gemm_planes_is_a_candidate_where_wa_is_not():
    lay = dispatch.layout(quantize_rtn(torch.randn(64, 384), IntGroup(bits=4, group_size=128)))  # 384 % 256 != 0
    assert any(p == "gemmp" for p, _ in dispatch.candidates(lay, 16))
    assert any(p == "mma4" for p, _ in dispatch.candidates(lay, 16))
    assert not any(p in ("gemmp", "wa") for p, _ in dispatch.candidates(lay, 1))
    lay = dispatch.layout(quantize_rtn(torch.randn(64, 512), IntGroup(bits=4, group_size=128)))  # "wa" replaces both
    paths = {p for p, _ in dispatch.candidates(lay, 16)}
    assert "wa" in paths and not paths & {"gemmp", "mma4"}


def test_every_candidate_for_one_format(ops, gen):
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=64))
    lay = dispatch.layout(w)
    for m in (1, 5, 33):
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        for path, config in dispatch.candidates(lay, dispatch._pow2(m)):
            if path == "dequant":
                continue
            err = relative_error(run_poisoned(ops, w, x, path, config), reference_fp32(w, x))
            assert err <= TOL, f"m={m} {path} {config}: {err:.2e} (seed {gen.seed_})"


def test_dequant_kernel_is_exact(ops, gen):
    for bits, group in [(4, 64), (3, 32), (8, None)]:
        w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=bits, group_size=group))
        lay = dispatch.layout(w)
        out = torch.full((K, N), float("nan"))
        ops.launch_int_dequant(lay.qa, lay.qb, lay.scales, lay.zeros,
                               [lay.k, lay.bits, lay.bits_a, lay.bits_b, lay.group, 0], out)
        assert torch.equal(out.t(), w.decode()), f"int{bits} g{group} (seed {gen.seed_})"
        assert torch.equal(out.t(), layout_decode(lay))


def test_fused_sum_int_lowrank(ops, gen):
    base = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=64))
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen) * 0.3,
                                       torch.randn(8, K, generator=gen) * 0.3)
    sw = SumWeight(format=parse_format("int4:g64+lowrank:r8"), shape=(N, K), base=base, extra=extra)
    assert dispatch.kernel_reason(sw) is None
    for m, path, config in [(1, "gemv", (1, 32, 64, 2, 4, 3)), (3, "gemv", (1, 64, 32, 1, 4, 3)),
                            (17, "gemm", (16, 32, 64, 1, 4, 3)), (17, "gemm", (32, 16, 32, 4, 4, 3))]:
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(run_poisoned(ops, sw, x, path, config), reference_fp32(sw, x))
        assert err <= TOL, f"m={m} {path} {config}: {err:.2e} (seed {gen.seed_})"


def test_kernel_linear_act_order_bias_and_batch_dims(ops, gen):
    fmt = IntGroup(bits=3, group_size=64, act_order=True)
    w = quantize_rtn(torch.randn(N, K, generator=gen), fmt, torch.randperm(K, generator=gen))
    bias = torch.randn(N, generator=gen)
    x = torch.randn(2, 3, K, generator=gen).to(torch.float16)
    y = dispatch.kernel_linear(w, x, bias, out_dtype=torch.float32)
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    err = relative_error(y, reference_fp32(w, x, bias))
    assert err <= TOL, f"{err:.2e} (seed {gen.seed_})"
    y16 = dispatch.kernel_linear(w, x, bias)  # output in the activation dtype: fp16 rounding on top
    assert y16.dtype == torch.float16 and relative_error(y16, reference_fp32(w, x, bias)) <= 2e-3


@pytest.mark.parametrize("group", [None, 64])
def test_ternary_runs_on_the_int_kernels(ops, group, gen):
    w = quantize_ternary(torch.randn(N, K, generator=gen), Ternary(group_size=group))
    for m in (1, 20):
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(dispatch.kernel_linear(w, x, out_dtype=torch.float32), reference_fp32(w, x))
        assert err <= TOL, f"m={m} g={group}: {err:.2e} (seed {gen.seed_})"


def test_int_mm_op_registration(ops, gen):
    """The custom op has a consistent schema and fake implementation (what torch.compile traces)."""
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=64))
    lay = dispatch.layout(w)
    x = torch.randn(2, K, generator=gen).to(torch.float16)
    args = (x, lay.qa, lay.qb, lay.scales, lay.zeros, None, None, [K, 4, 4, 0, 64, 0], "gemv", [1, 32, 64, 1, 4, 3],
            torch.float32)
    torch.library.opcheck(ops.int_mm, args, test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        y = torch.ops.tensorslim.int_mm(fx, *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                             for a in args[1:]])
    assert y.shape == (2, N) and y.dtype == torch.float32


@pytest.mark.parametrize("group,sym", [(128, False), (None, True), (256, False)])
def test_int4_mma_matches_reference(ops, group, sym, gen):
    """The int4 tensor-core kernel (bit-trick operands, zero point folded out) incl. split-K and the Sum epilogue."""
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=group, symmetric=sym))
    for m, config in [(5, (16, 32, 128, 1, 4, 3)), (33, (32, 16, 128, 2, 4, 3))]:
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(run_poisoned(ops, w, x, "mma4", config), reference_fp32(w, x))
        assert err <= TOL, f"g={group} sym={sym} m={m} {config}: {err:.2e} (seed {gen.seed_})"
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen) * 0.3,
                                       torch.randn(8, K, generator=gen) * 0.3)
    sw = SumWeight(format=parse_format(f"{w.format.spec()}+lowrank:r8"), shape=(N, K), base=w, extra=extra)
    x = torch.randn(3, K, generator=gen).to(torch.float16)
    err = relative_error(run_poisoned(ops, sw, x, "mma4", (16, 16, 128, 1, 4, 3)), reference_fp32(sw, x))
    assert err <= TOL, f"sum: {err:.2e} (seed {gen.seed_})"


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, True), (2, 32, False)])
def test_gemv_tile_spans_groups(ops, bits, group, sym, gen):
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=bits, group_size=group, symmetric=sym))
    for m, config in [(1, (1, 32, 128, 1, 4, 3)), (2, (1, 16, 128, 2, 4, 3))]:
        x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
        err = relative_error(run_poisoned(ops, w, x, "gemv", config), reference_fp32(w, x))
        assert err <= TOL, f"bits={bits} g={group} m={m} {config}: {err:.2e} (seed {gen.seed_})"
