"""BCQ through the weights-as-A kernel ("wa", :mod:`tensorslim.kernels.triton.wa_bcq`).

The 1-bit plane layout is checked against the planes bit by bit, the 1-bit ``lop3`` string is executed by the PTX
emulator of ``test_fp4_wa``, and the kernel's plain-Triton form runs under the interpreter against ``x @ decode()^T``
in fp32 (poisoned outputs, split-K both ways, 1 to 4 planes, groups of 32 to 512). The GPU form is checked at run
time by ``dispatch_ext.wa_ext_verified`` and by ``bench/kernels.py --new-formats``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorslim.formats import parse_format
from tensorslim.formats.bcq import quantize_bcq, unpack_planes
from tensorslim.kernels import dispatch_ext
from tensorslim.kernels.layout_ext import bcq_wa_layout, bcq_wa_reason, wa_pack1
from tensorslim.kernels.reference import reference_fp32, relative_error
from tests.kernels.test_fp4_wa import _halves, run_ptx

TOL = 1e-3


@pytest.mark.parametrize("j", [32, 64])
def test_wa_pack1_places_every_bit(gen, j):
    bits = torch.randint(0, 2, (6, 1024), generator=gen)
    words = wa_pack1(bits, j).view(torch.int32)
    assert words.shape == (6, 32)
    w = words.long() & 0xFFFFFFFF
    k = torch.arange(1024)
    blk, r = k // (16 * j), k % (16 * j)
    t, p, e = r // j, (r % j) // 2, r % 2
    got = (w[:, blk * (j // 2) + p] >> (t + 16 * e)[None, :]) & 1  # the kernel's reading of input k
    assert torch.equal(got, bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_bit_lop3_gives_c_plus_bit(dtype):
    from tensorslim.kernels.triton import wa

    s = (wa._LOP1_BF16 if dtype == torch.bfloat16 else wa._LOP1_FP16).value
    c = 128.0 if dtype == torch.bfloat16 else 1024.0
    rng = np.random.default_rng(0)
    word = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    for t in range(16):
        v = word >> np.uint32(t)
        got = _halves(run_ptx(s, v, np.zeros_like(v)), dtype).double()
        want = torch.from_numpy(np.stack([(v & 1), (v >> 16) & 1], 1).astype(np.float64)) + c
        assert torch.equal(got, want), t


def bcq_weight(n: int, k: int, spec: str, gen):
    w = torch.randn(n, k, generator=gen) * 0.02
    w[2, :64] += 0.5  # a group with a large offset (the kernel's offset - sum alpha term)
    return quantize_bcq(w, parse_format(spec), rounds=3)


def test_layout_and_reasons(gen):
    cw = bcq_weight(40, 1024, "bcq3:g128", gen)
    wl = bcq_wa_layout(cw)
    assert bcq_wa_reason(cw) is None and wl.q == 3 and wl.j == 32
    assert bcq_wa_layout(bcq_weight(8, 2048, "bcq2:g1024", gen)).j == 64  # groups of 1024: blocks of 1024
    assert wl.planes.shape == (3, 40, 32) and wl.a2.shape == (3, 40, 8) and wl.c.shape == (40, 8)
    assert torch.equal(wl.a2, 2 * cw.alphas.float().permute(2, 0, 1))
    bits = unpack_planes(cw.planes, 3, cw.shape)
    assert torch.equal(wa_pack1(bits[1], 32), wl.planes[1])
    assert "blocks of 512 or 1024" in bcq_wa_reason(bcq_weight(8, 768, "bcq3:g128", gen))
    assert "blocks of 512 or 1024" in bcq_wa_reason(bcq_weight(8, 4096, "bcq3:g2048", gen))
    assert bcq_wa_reason(bcq_weight(8, 1024, "bcq3:g1024", gen)) is None  # one group a block
    from tensorslim.formats.mx import quantize_mx

    assert "takes BCQ" in bcq_wa_reason(quantize_mx(torch.randn(8, 512, generator=gen), parse_format("mxfp4")))
    assert dispatch_ext.wa_ext_reason(cw) is None


@pytest.fixture(scope="module")
def ops_ext(ops):
    from tensorslim.kernels import ops_ext as mod

    return mod


@pytest.mark.parametrize("spec,k", [("bcq3:g128", 1024), ("bcq1:g1024", 2048), ("bcq2:g32", 1536),
                                    ("bcq4:g64", 1536)])
def test_wa_bcq_kernel_matches_reference(ops_ext, gen, spec, k):
    """Plain-Triton form under the interpreter (fp16 activations: its bf16 ``tl.dot`` is unreliable); blocks of 512
    (J = 32) and, for groups of 1024, of 1024 (J = 64)."""
    from tensorslim.kernels import ops

    n = 40
    cw = bcq_weight(n, k, spec, gen)
    wl = dispatch_ext.wa_ext(cw)
    for m, config in [(1, (8, 64, 1, 4, 3)), (3, (16, 32, 2, 2, 3))]:
        config = config[:2] + (min(config[2], k // (16 * wl.j)),) + config[3:]
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        ref = reference_fp32(cw, x)
        out = torch.zeros(m, n) if config[2] > 1 else torch.full((m, n), float("nan"))
        ops_ext.launch_bcq_wa(x, wl.planes, wl.a2, wl.c, wl.meta(), list(config), out)
        assert relative_error(out, ref) <= TOL, (spec, m, config, gen.seed_)
        y = ops_ext.bcq_wa_mm(x, wl.planes, wl.a2, wl.c, wl.meta(), list(config), torch.float16)
        assert y.dtype == torch.float16 and relative_error(y.float(), ref) <= 4e-3, (spec, m, config, gen.seed_)
        ws, cnt = ops.split_scratch(x.device, m, n, 1)
        assert not ws.any() and not cnt.any()


def test_dispatch_runs_wa_first_and_op_registration(ops_ext, gen):
    cw = bcq_weight(40, 512, "bcq3:g128", gen)
    lay = dispatch_ext.layout(cw)
    assert dispatch_ext.candidates(cw, lay, 1, torch.float16)[0][0] == "wa"
    assert dispatch_ext.candidates(cw, lay, 1, torch.float32)[0][0] != "wa"  # fp32 activations: the other paths
    x = torch.randn(2, 3, 512, generator=gen).to(torch.float16)
    bias = torch.randn(40, generator=gen)
    y = dispatch_ext.ext_linear(cw, x, bias, out_dtype=torch.float32)
    assert y.shape == (2, 3, 40) and relative_error(y, reference_fp32(cw, x, bias)) <= TOL, gen.seed_
    wl = dispatch_ext.wa_ext(cw)
    args = (x[0], wl.planes, wl.a2, wl.c, wl.meta(), [8, 64, 1, 4, 3], torch.float16)
    torch.library.opcheck(ops_ext.bcq_wa_mm, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", ["mxfp4", "nvfp4", "bcq"])
def test_self_check_configs_are_valid_launches(ops_ext, kind, monkeypatch):
    """The device self-check's weight and configs must be valid launches for every kind (a split-K larger than the
    block count once made it fail on the GPU and turned BCQ "wa" off); run here on the CPU through the interpreter."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(dispatch_ext, "_WAEXT_CHECKED", {})
    assert dispatch_ext.wa_ext_verified(kind, cpu, torch.float16)


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4", "bcq3:g128"])
def test_prepare_kernels_runs_float_and_bcq_from_the_wa_repack(ops_ext, gen, spec, caplog, monkeypatch):
    """``prepare_kernels`` for MXFP4 / NVFP4 / BCQ: the stored weight goes to the host (here the same CPU, under the
    interpreter), calls run from the "wa" repack alone and match the reference, a call the kernels cannot take
    (fp32) uses the stored weight with a warning, a deep copy runs, a move undoes it; weights whose "wa" does not fit
    (or, MX, whose exponents do not suit fp16) are left alone."""
    import copy

    from tensorslim.formats import CompressedLinear
    from tensorslim.formats.mx import quantize_mx, quantize_nvfp4

    n, k = 40, 1024
    w0 = torch.randn(n, k, generator=gen) * 0.02
    w = (bcq_weight(n, k, spec, gen) if spec.startswith("bcq")
         else quantize_nvfp4(w0, parse_format(spec)) if spec == "nvfp4" else quantize_mx(w0, parse_format(spec)))
    bias = torch.randn(n, generator=gen)
    lin = CompressedLinear(w, bias)
    assert lin.prepare_kernels() and lin._kernel[0] is None and lin.compressed is not w and "prepared" in lin.extra_repr()
    wl = lin._kernel[2]
    assert wl.device == w.device and wl.k == k and wl.n == n
    calls = []
    run = dispatch_ext.wa_layout_linear
    monkeypatch.setattr(dispatch_ext, "wa_layout_linear", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    x = torch.randn(2, 3, k, generator=gen).to(torch.float16)
    y = lin(x)
    assert calls and y.shape == (2, 3, n) and relative_error(y, reference_fp32(w, x, bias)) <= 2e-3
    with caplog.at_level("WARNING"):
        y32 = lin(x.float())
    assert len(calls) == 1 and "host memory" in caplog.text
    assert relative_error(y32, reference_fp32(w, x.float(), bias)) <= 1e-5
    twin = copy.deepcopy(lin)
    assert twin._kernel[2] is not wl and torch.equal(twin(x), lin(x))
    lin.half()  # a move brings the stored weight back and drops the repack (and makes the bias fp16)
    assert lin._kernel is None
    assert relative_error(lin(x.float()), reference_fp32(w, x.float(), lin.bias.float())) <= 1e-5


def test_prepare_kernels_leaves_float_weights_without_a_wa_repack(ops_ext, gen):
    from tensorslim.formats import CompressedLinear
    from tensorslim.formats.mx import quantize_mx, quantize_nvfp4

    assert not CompressedLinear(quantize_nvfp4(torch.randn(8, 128, generator=gen), parse_format("nvfp4"))
                                ).prepare_kernels()  # 128 inputs: no 256-input block
    tiny = quantize_mx(torch.randn(16, 512, generator=gen) * 1e-9, parse_format("mxfp4"))  # fp16 out of range
    assert not CompressedLinear(tiny).prepare_kernels()
    assert not CompressedLinear(quantize_mx(torch.randn(16, 512, generator=gen), parse_format("mxfp8"))
                                ).prepare_kernels()


@pytest.mark.parametrize("kind", ["mxfp4", "nvfp4", "bcq3 J32", "bcq3 J64"])
def test_wa_configs_exist_for_every_batch_and_fit_shared_memory(gen, kind):
    """A prepared module runs every batch size through "wa", so every batch bucket needs configs. Before session 14
    there were none above 64 rows (the integer kernel's wide sets are half-block configs, and its one full-block
    set did not fit a 64-row activation tile of 512 inputs in 3 stages): a prepared module failed at 128 rows on
    the GPU. Every config must also fit Hopper's 227 KB of shared memory (words + activations a stage)."""
    from tensorslim.formats.mx import quantize_mx, quantize_nvfp4

    k = 2048
    w0 = torch.randn(128, k, generator=gen) * 0.02
    if kind.startswith("bcq"):
        wl = bcq_wa_layout(bcq_weight(128, k, "bcq3:g128", gen), int(kind[-2:]))
    else:
        wl = dispatch_ext.wa_ext(quantize_nvfp4(w0, parse_format("nvfp4")) if kind == "nvfp4"
                                 else quantize_mx(w0, parse_format("mxfp4")))
    inputs = 16 * wl.j if kind.startswith("bcq") else 8 * wl.j  # a block
    bits = 3 if kind.startswith("bcq") else 4
    for m in (1, 2, 8, 16, 32, 64, 128, 256, 1024, 4096):
        cands = dispatch_ext.wa_configs(wl, m)
        assert cands, (kind, m)
        assert (("dequant", ()) in cands) == (m >= 64)
        for _, (bm, bn, split, warps, stages) in (c for c in cands if c[0] == "wa"):
            assert stages * (bn * inputs * bits // 8 + inputs * bm * 2) <= 227 * 1024, (kind, m, bm, bn, stages)
            assert 1 <= split <= wl.k // inputs and bm >= 8 and bn >= 16


def test_prepared_bcq_module_runs_many_rows(ops_ext, gen):
    """The GPU failure above, under the interpreter: a prepared BCQ3 module at 65 and 128 rows."""
    from tensorslim.formats import CompressedLinear

    w = bcq_weight(40, 512, "bcq3:g128", gen)
    lin = CompressedLinear(w)
    assert lin.prepare_kernels()
    for m in (65, 128):
        x = torch.randn(m, 512, generator=gen).to(torch.float16)
        assert relative_error(lin(x).float(), reference_fp32(w, x)) <= 4e-3, (m, gen.seed_)


@pytest.mark.parametrize("kind", ["mxfp4", "mxfp4:b64", "nvfp4", "bcq1:g1024", "bcq2:g32", "bcq3:g128", "bcq4:g512",
                                  "bcq3:g128 J64"])
def test_wa_ext_dequant_is_decode_rounded_once(ops_ext, gen, kind):
    """The "dequant" path's dense weight from the "wa" repack (:mod:`tensorslim.kernels.triton.wa_ext_dequant`) is
    ``decode()`` rounded once to the activation dtype: identical for MX (exact products), within one rounding step
    elsewhere (fp32 reassociation before the rounding); odd row counts exercise the row mask. Then the path itself,
    through a "wa"-only call as a prepared module makes it, against ``x @ decode()^T``."""
    from tensorslim.formats.mx import quantize_mx, quantize_nvfp4

    n, k = 37, 1024
    w0 = torch.randn(n, k, generator=gen) * 0.02
    if kind.startswith("bcq"):
        cw = bcq_weight(n, k, kind.split()[0], gen)
        wl = bcq_wa_layout(cw, 64) if kind.endswith("J64") else dispatch_ext.wa_ext(cw)
    else:
        spec = {"mxfp4:b64": "mxfp4:b64"}.get(kind, kind)
        cw = quantize_nvfp4(w0, parse_format(spec)) if kind == "nvfp4" else quantize_mx(w0, parse_format(spec))
        wl = dispatch_ext.wa_ext(cw)
    for dtype in (torch.bfloat16, torch.float16):
        if not kind.startswith("bcq") and not wl.dtype_ok(dtype):
            continue
        got = dispatch_ext.wa_ext_dequant(wl, dtype)
        want = cw.decode(torch.float32)
        assert got.shape == (n, k) and got.dtype == dtype
        if kind.startswith("mx"):
            assert torch.equal(got, want.to(dtype)), (kind, dtype)
        else:  # one step of the dtype's grid at most, where fp32 rounding order moved a value across a midpoint
            step = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((got.float() - want).abs() <= step).all(), (kind, dtype)
            assert (got != want.to(dtype)).float().mean() < 1e-3, (kind, dtype)
    x = torch.randn(65, k, generator=gen).to(torch.float16)
    y = dispatch_ext.wa_layout_linear(wl, x, choice=("dequant", ()), out_dtype=torch.float32)
    assert relative_error(y, reference_fp32(cw, x)) <= 4e-3, (kind, gen.seed_)
    torch.library.opcheck(*((ops_ext.bcq_wa_dequant, (wl.planes, wl.a2, wl.c, wl.meta(), torch.float16))
                            if kind.startswith("bcq") else
                            (ops_ext.fp4_wa_dequant, (wl.q, wl.sc, wl.meta(), wl.post, torch.float16))),
                          test_utils=("test_schema", "test_faketensor"))
