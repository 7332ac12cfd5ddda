"""The weights-as-A kernel ("wa", int4 and int2 / ternary, :mod:`tensorslim.kernels.triton.wa`) under the interpreter
against ``x @ decode()^T`` in fp32, with poisoned outputs; its layout against the stored codes; its place in
dispatch.

fp16 activations (the interpreter mishandles bf16 ``tl.dot``; the GPU bench checks bf16). 40 outputs: not a multiple
of any tile. K = 1024: two blocks of 512 inputs (J = 64), so split-K runs.
"""

from __future__ import annotations

import pytest
import torch

from tensorslim.formats import IntGroup, SumWeight, parse_format, quantize_rtn
from tensorslim.formats.lowrank import LowRank, LowRankWeight
from tensorslim.formats.ternary import Ternary, quantize_ternary
from tensorslim.kernels import dispatch
from tensorslim.kernels.layout import unpack_plane, wa_block_words, wa_layout, wa_reason
from tensorslim.kernels.reference import reference_fp32, relative_error

TOL = 1e-3
N, K = 40, 1024


def run_wa(ops, cw, x, config):
    """One "wa" launch into a NaN-poisoned (or, for split-K, zeroed) fp32 buffer."""
    base = dispatch._int_part(cw)
    lay = dispatch.layout(base)
    x2d = x if lay.perm is None else x.index_select(1, lay.perm)
    t = u = None
    if base is not cw:
        t, u = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), cw.extra.v.float()), cw.extra.u
    wl = dispatch.wa_of(lay)
    out = torch.zeros(x.shape[0], lay.n) if config[2] > 1 else torch.full((x.shape[0], lay.n), float("nan"))
    ops.launch_wa(x2d.contiguous(), wl.q, wl.scales, wl.zeros, t, u, dispatch.wa_meta(wl),
                       list(config), out)
    return out


def test_wa_layout_holds_the_codes(gen):
    """Input J t + 2p + e (t = 4h + u) of a block is nibble 4e + u of word h J/2 + p: undoing that gives the codes."""
    for j in (16, 32, 64):
        w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=128))
        lay = dispatch.layout(w)
        wl = wa_layout(lay, j)
        assert wl.q.dtype == torch.int32 and wl.q.shape == (N, K // 8) and wl.q.is_contiguous()
        q = (wl.q.view(torch.uint8).long().reshape(N, K // 2, 1) >> torch.tensor([0, 4])) & 15  # little-endian
        q = q.reshape(N, K // (8 * j), 2, j // 2, 2, 4).permute(0, 1, 2, 5, 3, 4).reshape(N, K)
        codes, _, zero = w.unpacked()
        assert torch.equal(q, codes) and torch.equal(q, unpack_plane(lay.qa, 4, K))
        assert torch.equal(wl.zeros.long(), zero.long()) and torch.equal(wl.scales, w.scales)
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=2, group_size=128))
    wl = wa_layout(dispatch.layout(w), 32)  # int2: input 32 t + 2p + e is code 8e + t of word p
    assert wl.bits == 2 and wl.q.shape == (N, K // 16)
    q = (wl.q.view(torch.uint8).long().reshape(N, K // 4, 1) >> torch.tensor([0, 2, 4, 6])) & 3
    q = q.reshape(N, K // 256, 16, 2, 8).permute(0, 1, 4, 2, 3).reshape(N, K)
    assert torch.equal(q, w.unpacked()[0])
    j = 32  # int3, two planes block by block: J/2 low words (as int2), J/4 high words (bit 16e + 8h + t, p = 2p' + h)
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=3, group_size=64))
    wl = wa_layout(dispatch.layout(w), j)
    assert wl.bits == 3 and wl.q.shape == (N, K * 3 // 32)
    blk = wl.q.reshape(N, K // (8 * j), 3 * j // 4)
    low = (blk[..., : j // 2].contiguous().view(torch.uint8).long().unsqueeze(-1) >> torch.tensor([0, 2, 4, 6])) & 3
    low = low.reshape(N, K // (8 * j), j // 2, 2, 8).permute(0, 1, 4, 2, 3).reshape(N, K)
    high = (blk[..., j // 2:].contiguous().view(torch.uint8).long().unsqueeze(-1) >> torch.arange(8)) & 1
    high = high.reshape(N, K // (8 * j), j // 4, 2, 2, 8).permute(0, 1, 5, 2, 4, 3).reshape(N, K)
    assert torch.equal(low | high << 2, w.unpacked()[0])


@pytest.mark.parametrize("group,sym", [(128, False), (64, True), (32, False), (256, False), (None, True)])
def test_wa_matches_reference(ops, group, sym, gen):
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=group, symmetric=sym))
    w.scales.view(-1)[torch.randperm(w.scales.numel(), generator=gen)[:5]] = 0  # dead groups (the layout rewrites)
    for m, config in [(1, (16, 64, 1, 4, 3)), (5, (8, 64, 2, 4, 2)), (33, (32, 128, 2, 8, 3)), (7, (8, 32, 2, 2, 3)),
                      (33, (16, 128, 2, 8, 2, 1)), (2, (8, 16, 1, 1, 3, 1))]:  # half-block iterations; 16 rows
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(run_wa(ops, w, x, config), reference_fp32(w, x))
        assert err <= TOL, f"g={group} sym={sym} m={m} {config}: {err:.2e} (seed {gen.seed_})"


@pytest.mark.parametrize("fmt", ["int2:g128", "int2:g64:sym", "int2:pc", "ternary:g128", "ternary", "int3:g128",
                                 "int3:g64:sym", "int3:g32", "int3:pc"])
def test_wa_two_bit_matches_reference(ops, fmt, gen):
    """2-bit codes (int2 and ternary, whose codes t + 1 are int2 with zero point 1) and 3-bit codes (a 2-bit plane
    plus a 1-bit plane) on the same kernel."""
    w = torch.randn(N, K, generator=gen)
    if fmt.startswith("ternary"):
        g = fmt.partition(":g")[2]
        cw = quantize_ternary(w, Ternary(group_size=int(g) if g else None))
    else:
        cw = quantize_rtn(w, parse_format(fmt))
    lay = dispatch.layout(cw)
    assert wa_reason(lay) is None and dispatch.wa_of(lay).bits == (3 if fmt.startswith("int3") else 2)
    for m, config in [(1, (8, 64, 2, 4, 3)), (6, (16, 32, 1, 2, 2)), (33, (32, 64, 2, 4, 3))]:
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(run_wa(ops, cw, x, config), reference_fp32(cw, x))
        assert err <= TOL, f"{fmt} m={m} {config}: {err:.2e} (seed {gen.seed_})"


def test_wa_uneven_split_k(ops, gen):
    """3 blocks of 512 inputs in 2 splits (2 + 1 blocks), as Llama-2's 11008 inputs (43 blocks of 256) need."""
    k = 1536
    w = quantize_rtn(torch.randn(N, k, generator=gen), IntGroup(bits=4, group_size=128))
    for m, config in [(1, (8, 64, 2, 4, 3)), (4, (16, 64, 3, 4, 2)), (3, (16, 32, 2, 4, 2, 1))]:
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        err = relative_error(run_wa(ops, w, x, config), reference_fp32(w, x))
        assert err <= TOL, f"m={m} {config}: {err:.2e} (seed {gen.seed_})"


def test_wa_sum_epilogue_and_act_order(ops, gen):
    """The fused low-rank epilogue (added once under split-K) and act-order weights (activations permuted)."""
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=128, act_order=True),
                     torch.randperm(K, generator=gen))
    assert w.perm is not None
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen) * 0.3,
                                       torch.randn(8, K, generator=gen) * 0.3)
    sw = SumWeight(format=parse_format(f"{w.format.spec()}+lowrank:r8"), shape=(N, K), base=w, extra=extra)
    for cw in (w, sw):
        for m, config in [(3, (16, 64, 1, 4, 3)), (17, (32, 64, 2, 4, 3)), (17, (16, 64, 2, 4, 3, 1))]:
            x = torch.randn(m, K, generator=gen).to(torch.float16)
            err = relative_error(run_wa(ops, cw, x, config), reference_fp32(cw, x))
            assert err <= TOL, f"{type(cw).__name__} m={m} {config}: {err:.2e} (seed {gen.seed_})"
    x = torch.randn(2, 3, K, generator=gen).to(torch.float16)  # through kernel_linear: batch dims, bias, fp16 out
    bias = torch.randn(N, generator=gen)
    for choice in (("wa", (16, 64, 2, 4, 3)), ("wa", (16, 64, 1, 4, 3)), ("gemv", (1, 64, 128, 1, 4, 3)),
                   ("gemm", (16, 32, 64, 2, 4, 3)), ("dequant", ())):
        # x and V both in the layout's (permuted) input order; unpermuted x with unpermuted V was a fixed bug before
        y = dispatch.kernel_linear(sw, x, bias, choice=choice)
        assert y.shape == (2, 3, N) and y.dtype == torch.float16
        assert relative_error(y, reference_fp32(sw, x, bias)) <= 2e-3, choice


def test_wa_serial_split_k_leaves_its_workspace_clean(ops, gen):
    """Split-K through the workspace (what ``wa_mm`` runs): the tile's last split writes a poisoned output of any
    dtype, and the workspace and counters are zero again afterwards, so the next call (other rows, other weights)
    is right too. 5 blocks of 512 inputs in 2, 3 and 4 splits (4: 2 + 2 + 1 + 0, one split has no block), several
    tiles in M and N."""
    k = 2560
    w = quantize_rtn(torch.randn(N, k, generator=gen), IntGroup(bits=4, group_size=128))
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen) * 0.3,
                                       torch.randn(8, k, generator=gen) * 0.3)
    sw = SumWeight(format=parse_format(f"{w.format.spec()}+lowrank:r8"), shape=(N, k), base=w, extra=extra)
    wl = dispatch.wa_of(dispatch.layout(w))
    for cw in (w, sw, w):
        for m, config in [(1, (8, 16, 2, 1, 3)), (19, (16, 16, 3, 1, 2)), (33, (16, 32, 4, 2, 3, 1))]:
            x = torch.randn(m, k, generator=gen).to(torch.float16)
            ref = reference_fp32(cw, x)
            tiles = -(-m // config[0]) * -(-N // config[1])
            ws, cnt = ops.split_scratch(x.device, m, N, tiles)
            assert ops.split_scratch(x.device, m, N, tiles)[0] is ws  # made once
            t, u = (torch.nn.functional.linear(x.float(), extra.v.float()), extra.u) if cw is sw else (None, None)
            for dt in (torch.float32, torch.float16):
                out = torch.full((m, N), float("nan"), dtype=dt)
                ops.launch_wa(x, wl.q, wl.scales, wl.zeros, t, u, dispatch.wa_meta(wl), list(config), out,
                              scratch=(ws, cnt))
                err = relative_error(out.float(), ref)
                assert err <= (TOL if dt == torch.float32 else 2e-3), f"m={m} {config} {dt}: {err:.2e} ({gen.seed_})"
                assert not ws.any() and not cnt.any(), "the workspace must be left zeroed"
            vp = dispatch.v_parts(extra, x.dtype) if cw is sw else None
            y = ops.wa_mm(x, wl.q, wl.scales, wl.zeros, vp, u, dispatch.wa_meta(wl), list(config), torch.float16)
            assert y.dtype == torch.float16 and relative_error(y, ref) <= 2e-3 and not ws.any()


def test_wa_in_dispatch(ops):
    def lay(bits, group, k=K):
        return dispatch.layout(quantize_rtn(torch.randn(N, k), IntGroup(bits=bits, group_size=group)))

    for m in (1, 16, 64, 128):
        cands = dispatch.candidates(lay(4, 128), m)
        wa = [c for c in cands if c[0] == "wa"]
        assert wa and all(c[1][0] >= min(8, m) and 1 <= c[1][2] <= K // 512 for c in wa), wa
    assert any(c[0] == "wa" for c in dispatch.candidates(lay(3, 128), 16))  # int3: two planes, since session 6
    assert not any(c[0] == "wa" for c in dispatch.candidates(lay(5, 128), 16))
    assert wa_reason(lay(5, 128)) and wa_reason(lay(4, 64, k=576)) and wa_reason(lay(4, 128)) is None
    assert wa_reason(lay(3, 128)) is None
    assert wa_block_words(512, 128) == 64 and wa_block_words(768, 128) == 32 and wa_block_words(512, 32) == 32
    assert wa_block_words(576, 64) is None and wa_block_words(11008, 128) == 32 and wa_block_words(512, 96) is None


def test_wa_mm_op_registration(ops, gen):
    """The custom op has a consistent schema and fake implementation (what torch.compile traces), split-K included."""
    w = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=128))
    wl = dispatch.wa_of(dispatch.layout(w))
    x = torch.randn(3, K, generator=gen).to(torch.float16)
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen),
                                       torch.randn(8, K, generator=gen))
    vp = dispatch.v_parts(extra, x.dtype)
    assert not ops.pdl_ok(x)  # programmatic dependent launch: compiled Hopper+ code only, never the interpreter
    for config in ([16, 64, 1, 4, 3], [16, 64, 2, 4, 3]):
        for lr in ((None, None), (vp, extra.u)):  # plain, and the fused Sum (lowrank_t then "wa" inside the op)
            args = (x, wl.q, wl.scales, wl.zeros, *lr, dispatch.wa_meta(wl), config, torch.float16)
            torch.library.opcheck(ops.wa_mm, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("m,k,r,vdt", [(1, 1024, 8, torch.float16), (5, 1000, 32, torch.float32),
                                       (17, 4096, 70, torch.bfloat16)])
def test_lowrank_t_partials(ops, m, k, r, vdt, gen):
    """V split into parts in the activation dtype sums to V exactly; the K-chunk partial sums of t = x V^T (fp16
    activations, fp32 out) add up to the float64 product; ragged K, r, m."""
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    extra = LowRankWeight.from_factors(LowRank(rank=r, dtype=str(vdt).split(".")[1]), torch.randn(8, r, generator=gen),
                                       torch.randn(r, k, generator=gen) * 0.3)
    vp = dispatch.v_parts(extra, torch.float16)
    assert vp.dtype == torch.float16 and vp.shape[1:] == (r, k)
    if vdt == torch.float16:
        assert vp.shape[0] == 1 and torch.equal(vp.double().sum(0), extra.v.double())
    else:  # fp32 / bf16 factors in fp16 parts: exact but for remainders below fp16's range
        assert vp.shape[0] <= 3 and relative_error(vp.double().sum(0), extra.v.double()) <= 1e-7
    tp = ops.lowrank_t(x, vp)
    assert tp.shape == (ops.lowrank_chunks(k)[0], m, r) and tp.dtype == torch.float32
    ref = x.double() @ extra.v.double().t()
    assert relative_error(tp.double().sum(0), ref) <= 1e-6
    torch.library.opcheck(ops.lowrank_t, (x, vp), test_utils=("test_schema", "test_faketensor"))
    if vdt == torch.float16:  # with bf16 activations: a bf16 part plus the 3 mantissa bits left, exactly
        assert torch.equal(dispatch.v_parts(extra, torch.bfloat16).double().sum(0), extra.v.double())


def test_v_parts_follow_the_permutation(gen):
    """The memoized parts are V's columns in the order asked for: unpermuted, then two different permutations of the
    same low-rank term (a memo keyed on "permuted or not" returned the first permutation's parts for the second)."""
    extra = LowRankWeight.from_factors(LowRank(rank=4), torch.randn(8, 4, generator=gen),
                                       torch.randn(4, 64, generator=gen))
    v = extra.v.double()
    assert torch.equal(dispatch.v_parts(extra, torch.float16).double().sum(0), v)
    for _ in range(2):
        perm = torch.randperm(64, generator=gen)
        for _ in range(2):  # second call: from the memo
            assert torch.equal(dispatch.v_parts(extra, torch.float16, perm).double().sum(0), v[:, perm])


def test_wa_sums_lowrank_partials(ops, gen):
    """The "wa" epilogue adds U t^T from the [C, M, r] partials exactly as from their sum (split-K and not)."""
    k = 3072  # 3 chunks of partial sums
    w = quantize_rtn(torch.randn(N, k, generator=gen), IntGroup(bits=4, group_size=128))
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen) * 0.3,
                                       torch.randn(8, k, generator=gen) * 0.3)
    sw = SumWeight(format=parse_format("int4:g128+lowrank:r8"), shape=(N, k), base=w, extra=extra)
    wl = dispatch.wa_of(dispatch.layout(w))
    for m, config in [(3, [16, 64, 1, 4, 3]), (9, [16, 32, 2, 4, 3, 1])]:
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        tp = ops.lowrank_t(x, dispatch.v_parts(extra, x.dtype))
        assert tp.shape[0] == 3
        out = torch.zeros(m, N) if config[2] > 1 else torch.full((m, N), float("nan"))
        ops.launch_wa(x, wl.q, wl.scales, wl.zeros, tp, extra.u, dispatch.wa_meta(wl), config, out)
        assert relative_error(out, reference_fp32(sw, x)) <= TOL, config


def test_split_scratch_per_stream_and_under_capture(ops, monkeypatch):
    """One pair per stream, made once; nothing allocated while a graph is captured: a capturing stream adopts the
    spare an eager call left (or gets None, and the caller falls back); larger requests get larger pairs."""
    monkeypatch.setattr(ops, "_SCRATCH", {})
    cpu = torch.device("cpu")
    a = ops.split_scratch(cpu, 4, 10, 3, stream=1, capturing=False)
    assert a[0].numel() >= 40 and a[1].numel() >= 3 and not a[0].any() and not a[1].any()
    assert ops.split_scratch(cpu, 2, 10, 1, stream=1, capturing=False) is a  # fits: the same pair
    b = ops.split_scratch(cpu, 4, 10, 3, stream=2, capturing=True)  # adopts the spare
    assert b is not None and b[0] is not a[0] and not b[0].any()
    assert ops.split_scratch(cpu, 4, 10, 3, stream=2, capturing=True) is b  # kept by that stream
    assert ops.split_scratch(cpu, 4, 10, 3, stream=3, capturing=True) is None  # no spare left: fall back
    assert ops.split_scratch(cpu, 4, 10, 3, stream=1, capturing=False) is a  # an eager call makes a new spare
    c = ops.split_scratch(cpu, 4, 10, 3, stream=3, capturing=True)
    assert c is not None and c[0] is not a[0] and c[0] is not b[0]
    big = ops.split_scratch(cpu, 100, 10, 50, stream=1, capturing=False)  # larger: a new pair, the old one kept
    assert big[0].numel() >= 1000 and big[1].numel() >= 50 and big[0] is not a[0]
    assert ops.split_scratch(cpu, 2, 10, 1, stream=1, capturing=False)[0] is a[0]
    assert ops.split_scratch(cpu, 100, 10, 50, stream=2, capturing=True) is not None  # the larger spare
