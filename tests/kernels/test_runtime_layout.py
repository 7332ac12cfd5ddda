"""The dispatcher's runtime layout (one kernel copy of the codes where "wa" runs) and the dequantizer that reads the
weights-as-A repack, under Triton's interpreter against ``decode()`` and ``x @ decode()^T`` in fp32."""

from __future__ import annotations

import pytest
import torch

from tensorslim.formats import IntGroup, SumWeight, parse_format, quantize_rtn
from tensorslim.formats.lowrank import LowRank, LowRankWeight
from tensorslim.formats.ternary import Ternary, quantize_ternary
from tensorslim.kernels import dispatch
from tensorslim.kernels.layout import wa_layout
from tensorslim.kernels.reference import reference_fp32, relative_error

N, K = 40, 1024


def _weight(fmt: str, gen: torch.Generator, k: int = K):
    w = torch.randn(N, k, generator=gen)
    if fmt.startswith("ternary"):
        g = fmt.partition(":g")[2]
        return quantize_ternary(w, Ternary(group_size=int(g) if g else None))
    return quantize_rtn(w, parse_format(fmt))


@pytest.mark.parametrize("fmt", ["int4:g128", "int4:g64:sym", "int4:g32", "int4:pc", "int3:g128", "int3:g64:sym",
                                 "int2:g128", "ternary:g128", "ternary"])
def test_wa_dequant_equals_decode(ops, fmt, gen):
    """Every weight of the repack, for both block widths, decodes to ``decode()`` rounded once to fp16 (the
    kernel's arithmetic: (q - z) exact, times the scale in fp32); dead groups (scale 0) decode to 0."""
    cw = _weight(fmt, gen)
    if not fmt.startswith("ternary"):
        cw.scales.view(-1)[torch.randperm(cw.scales.numel(), generator=gen)[:4]] = 0
    ref = cw.decode().to(torch.float32)
    for j in (32, 64):
        if cw.format.group(K) % j if hasattr(cw.format, "group") else False:
            continue
        wl = wa_layout(dispatch.layout(cw), j)
        w = ops.wa_dequant(wl.q, wl.scales, wl.zeros, dispatch.wa_meta(wl), torch.float16)
        assert w.shape == (N, K) and w.dtype == torch.float16
        assert torch.equal(w, ref.to(torch.float16)), f"{fmt} j={j}: max diff {(w.float() - ref).abs().max():.3e}"


def test_runtime_layout_keeps_only_the_wa_repack(ops, gen):
    """Where "wa" runs, the dispatcher keeps its repack alone (no transposed words, no transposed scales), offers
    "wa" (and "dequant" from the repack at 64+ rows), and computes the same products; elsewhere it keeps the full
    layout."""
    w = _weight("int4:g128", gen)
    lay = dispatch.runtime_layout(w)
    assert lay.qa is None and lay.qb is None and lay.scales is None and lay.zeros is None
    assert dispatch.runtime_layout(w) is lay and w not in dispatch._LAYOUTS  # memoized; no full layout kept
    assert dispatch.wa_of(lay).q.shape == (N, K // 8)
    for m in (1, 16, 64, 128):
        cands = dispatch.candidates(lay, m)
        assert {c[0] for c in cands} == ({"wa", "dequant"} if m >= 64 else {"wa"}), cands
    x = torch.randn(3, K, generator=gen).to(torch.float16)
    assert relative_error(dispatch.kernel_linear(w, x), reference_fp32(w, x)) <= 2e-3
    five = _weight("int5:g128", gen)
    assert dispatch.runtime_layout(five) is dispatch.layout(five) and dispatch.layout(five).qa is not None
    copies = dispatch._cold_copies(lay, l2_bytes=1 << 20)  # tuning's cold copies clone the repack
    assert len(copies) > 1 and all(c.qa is None for c in copies)
    assert dispatch.wa_of(copies[1]).q.data_ptr() != dispatch.wa_of(lay).q.data_ptr()
    assert torch.equal(dispatch.wa_of(copies[1]).q, dispatch.wa_of(lay).q)


@pytest.mark.parametrize("fmt", ["int4:g128:act", "int3:g64", "ternary:g128"])
def test_runtime_dequant_path(ops, fmt, gen):
    """The "dequant" path on the runtime layout (the repack decoded, then a dense product), with act-order inputs
    and a fused low-rank term, against the fp32 reference."""
    if fmt.endswith(":act"):
        cw = quantize_rtn(torch.randn(N, K, generator=gen), IntGroup(bits=4, group_size=128, act_order=True),
                          torch.randperm(K, generator=gen))
    else:
        cw = _weight(fmt, gen)
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen) * 0.3,
                                       torch.randn(8, K, generator=gen) * 0.3)
    sw = SumWeight(format=parse_format(f"{cw.format.spec()}+lowrank:r8"), shape=(N, K), base=cw, extra=extra)
    lay = dispatch.runtime_layout(cw)
    assert lay.qa is None
    x = torch.randn(65, K, generator=gen).to(torch.float16)
    xp = x if lay.perm is None else x.index_select(1, lay.perm)
    for c in (cw, sw):
        lr = None if c is cw else (dispatch.v_parts(extra, x.dtype, lay.perm), extra.u)
        y = dispatch.run_choice(("dequant", ()), lay, xp, lr, torch.float16)
        assert y.shape == (65, N) and relative_error(y, reference_fp32(c, x)) <= 2e-3, (fmt, type(c).__name__)


def test_prepare_kernels_keeps_only_the_repack(ops, gen, caplog, monkeypatch):
    """``CompressedLinear.prepare_kernels``: the stored weight goes to the host (here the same CPU, under the
    interpreter), calls run from the repack alone and match the reference, a call the kernels cannot take (fp32)
    uses the stored weight with a warning, a move undoes it, and weights without a "wa" repack are left alone."""
    from tensorslim.formats import CompressedLinear

    w = _weight("int4:g128", gen)
    bias = torch.randn(N, generator=gen)
    lin = CompressedLinear(w, bias)
    assert lin.prepare_kernels() and lin._kernel is not None and lin.compressed is not w
    assert all(torch.equal(a, b) for a, b in zip(lin.compressed.tensors().values(), w.tensors().values()))
    assert "prepared" in lin.extra_repr()
    calls = []
    run = dispatch.layout_linear
    monkeypatch.setattr(dispatch, "layout_linear", lambda *a, **k: calls.append(1) or run(*a, **k))
    x = torch.randn(2, 3, K, generator=gen).to(torch.float16)
    y = lin(x)
    assert calls and y.shape == (2, 3, N) and relative_error(y, reference_fp32(w, x, bias)) <= 2e-3
    with caplog.at_level("WARNING"):
        y32 = lin(x.float())
    assert len(calls) == 1 and "host memory" in caplog.text and relative_error(y32, reference_fp32(w, x.float(), bias)) <= 1e-5
    import copy

    twin = copy.deepcopy(lin)  # its own layout objects, which the dispatcher's memo has never seen
    assert twin._kernel[0] is not lin._kernel[0] and torch.equal(twin(x), lin(x))
    lin.half()  # a move (here a no-op for the stored dtypes) brings the stored weight back and drops the repack
    assert lin._kernel is None and relative_error(lin(x.float()), reference_fp32(w, x.float(), bias)) <= 1e-5
    assert not CompressedLinear(_weight("int5:g128", gen)).prepare_kernels()
    assert not CompressedLinear(quantize_rtn(torch.randn(N, 576, generator=gen), IntGroup(bits=4, group_size=64))
                                ).prepare_kernels()  # 576 inputs: no "wa" block fits
    extra = LowRankWeight.from_factors(LowRank(rank=8), torch.randn(N, 8, generator=gen) * 0.3,
                                       torch.randn(8, K, generator=gen) * 0.3)
    sw = SumWeight(format=parse_format(f"{w.format.spec()}+lowrank:r8"), shape=(N, K), base=w, extra=extra)
    lin = CompressedLinear(sw)
    assert lin.prepare_kernels() and lin._kernel[1] is extra
    assert relative_error(lin(x), reference_fp32(sw, x)) <= 2e-3
    from tensorslim.formats import prepare_kernels

    model = torch.nn.Sequential(CompressedLinear(_weight("int4:g128", gen)), torch.nn.ReLU(),
                                CompressedLinear(_weight("int5:g128", gen)))
    assert prepare_kernels(model) == (1, 2) and model[0]._kernel is not None and model[2]._kernel is None


def test_prepared_modules_save_what_they_stored(ops, gen):
    """A checkpoint of prepared modules holds the stored tensors (from the host copy), unchanged."""
    from tensorslim.formats import CompressedLinear, prepare_kernels
    from tensorslim.io.checkpoint import collect_state

    model = torch.nn.Sequential(CompressedLinear(_weight("int4:g128", gen)), CompressedLinear(_weight("int3:g64", gen)))
    before, layers_before, _ = collect_state(model)
    assert prepare_kernels(model) == (2, 2)
    after, layers_after, _ = collect_state(model)
    assert layers_after == layers_before and sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_runtime_layout_only_where_wa_passed_its_self_check(ops, gen, monkeypatch):
    """The "wa" self-check covers the dequantizer of its repack too (a wrong one fails it), and a weight whose "wa"
    did not pass keeps the full layout, so the other paths remain."""
    key = ("wa", 3, "cpu", torch.float16)
    dispatch._CHECKED.pop(key, None)
    assert dispatch.kernel_verified("wa", 3, torch.device("cpu"), torch.float16)
    dispatch._CHECKED.pop(key, None)
    monkeypatch.setattr(ops, "launch_wa_dequant", lambda q, s, z, meta, out: out.zero_())
    assert not dispatch.kernel_verified("wa", 3, torch.device("cpu"), torch.float16)
    dispatch._CHECKED.pop(key, None)
    monkeypatch.setattr(dispatch, "_wa_trusted", lambda lay: False)
    w = _weight("int4:g128", gen)
    lay = dispatch.runtime_layout(w)
    assert lay.qa is not None and {c[0] for c in dispatch.candidates(lay, 16)} >= {"wa", "gemv", "gemm"}


def test_prepared_module_traces_without_graph_breaks(ops, gen):
    """``torch.compile`` (dynamo, ``aot_eager``) traces a prepared module, and a deep copy of one, in one graph
    through the custom ops, with the reference's results."""
    import copy

    from tensorslim.formats import CompressedLinear

    w = _weight("int4:g128", gen)
    lin = CompressedLinear(w)
    assert lin.prepare_kernels()
    x = torch.randn(3, K, generator=gen).to(torch.float16)
    for mod in (lin, copy.deepcopy(lin)):
        torch._dynamo.reset()
        assert torch._dynamo.explain(mod)(x).graph_break_count == 0
        assert relative_error(torch.compile(mod, backend="aot_eager")(x), reference_fp32(w, x)) <= 2e-3
