"""BCQ (LUT-GEMM, sign-plane GEMM) and 2:4 sparse + int4 kernels (Triton interpreter, CPU) against
``x @ decode()^T`` in fp32 with poisoned outputs. GEMV-style paths take bf16 activations, tensor-core paths fp16
(the interpreter mishandles bf16 ``tl.dot``; the GPU bench checks bf16). 40 outputs: not a multiple of any tile.
"""

from __future__ import annotations

import pytest
import torch

from tensorslim.formats import parse_format
from tensorslim.formats.bcq import quantize_bcq
from tensorslim.formats.sparse import encode_sparse
from tensorslim.kernels import dispatch, dispatch_ext
from tensorslim.kernels.reference import reference_fp32, relative_error

TOL = 1e-3
N, K = 40, 128


@pytest.fixture(scope="module")
def ops_ext(ops):
    from tensorslim.kernels import ops_ext as mod

    return mod


def poisoned(m: int, config) -> torch.Tensor:
    return torch.zeros(m, N) if config[3] > 1 else torch.full((m, N), float("nan"))


def random_24_mask(gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(N, K // 4, 4, generator=gen).argsort(-1)[..., :2]
    return torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(N, K)


@pytest.mark.parametrize("spec,cases", [
    ("bcq3:g64", [(1, "lut", (1, 64, 32, 2, 4, 3)), (2, "gemm", (16, 32, 64, 1, 4, 3)),
                  (33, "gemm", (32, 64, 32, 2, 4, 3))]),
    ("bcq2:pc", [(3, "lut", (1, 64, 128, 1, 4, 3)), (16, "gemm", (16, 64, 128, 1, 4, 3))]),
], ids=["bcq3-g64", "bcq2-pc"])
def test_bcq_kernels_match_reference(ops_ext, spec, cases, gen):
    cw = quantize_bcq(torch.randn(N, K, generator=gen), parse_format(spec), rounds=2)
    assert dispatch.kernel_reason(cw) is None
    lay = dispatch_ext.layout(cw)
    for m, path, config in cases:
        x = torch.randn(m, K, generator=gen).to(torch.bfloat16 if path == "lut" else torch.float16)
        out = poisoned(m, config)
        ops_ext.launch_bcq_mm(x, lay.planes, lay.alphas, lay.offsets, lay.meta(), path, list(config), out)
        err = relative_error(out, reference_fp32(cw, x))
        assert err <= TOL, f"{spec} {path} m={m} {config}: {err:.2e} (seed {gen.seed_})"


def test_bcq_lut_tables(ops_ext, gen):
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
    lut = ops_ext.bcq_lut(x)
    e = torch.arange(256)
    signs = ((e[None, :] >> torch.arange(8)[:, None]) & 1).float() * 2 - 1  # [8, 256]
    want = x.float().reshape(2, 8, 8) @ signs
    assert torch.allclose(lut, want, atol=1e-5), f"seed {gen.seed_}"


@pytest.mark.parametrize("spec,cases", [
    ("sparse:2:4+int4:g64", [(1, "gemv", (1, 64, 64, 1, 4, 3)), (2, "gemv", (1, 32, 32, 2, 4, 3)),
                             (7, "gemm", (16, 64, 64, 1, 4, 3)), (33, "gemm", (32, 64, 32, 4, 4, 3))]),
    ("sparse:2:4+int4:g128:sym", [(16, "gemv", (1, 64, 128, 1, 4, 3)), (3, "gemm", (16, 64, 64, 2, 4, 3))]),
], ids=["g64", "g128-sym"])
def test_sparse24_kernels_match_reference(ops_ext, spec, cases, gen):
    cw = encode_sparse(parse_format(spec), torch.randn(N, K, generator=gen), random_24_mask(gen))
    assert dispatch.kernel_reason(cw) is None
    lay = dispatch_ext.layout(cw)
    inner = lay.inner
    for m, path, config in cases:
        x = torch.randn(m, K, generator=gen).to(torch.bfloat16 if path == "gemv" else torch.float16)
        out = poisoned(m, config)
        ops_ext.launch_sparse24_mm(x, inner.qa, lay.idx, inner.scales, inner.zeros, lay.meta(), path, list(config),
                                   out)
        err = relative_error(out, reference_fp32(cw, x))
        assert err <= TOL, f"{spec} {path} m={m} {config}: {err:.2e} (seed {gen.seed_})"


def test_dispatch_routes_and_reasons(ops_ext, gen):
    cw = encode_sparse(parse_format("sparse:2:4+int4:g64"), torch.randn(N, K, generator=gen), random_24_mask(gen))
    x = torch.randn(3, K, generator=gen).to(torch.float16)
    bias = torch.randn(N, generator=gen)
    err = relative_error(dispatch.kernel_linear(cw, x, bias, out_dtype=torch.float32), reference_fp32(cw, x, bias))
    assert err <= TOL, f"{err:.2e} (seed {gen.seed_})"
    dense24 = encode_sparse(parse_format("sparse:2:4"), torch.randn(N, K, generator=gen), random_24_mask(gen))
    assert "no kernel" in dispatch.kernel_reason(dense24)
    assert "multiples of 32" in dispatch.kernel_reason(quantize_bcq(torch.randn(8, 48, generator=gen),
                                                                   parse_format("bcq2:g16"), rounds=1))
    assert dispatch_ext.candidates(cw, dispatch_ext.layout(cw), 128, torch.bfloat16)[-1] == ("reference", ())


def test_ops_registration(ops_ext, gen):
    bw = quantize_bcq(torch.randn(16, 64, generator=gen), parse_format("bcq2:g64"), rounds=1)
    lay = dispatch_ext.layout(bw)
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
    torch.library.opcheck(ops_ext.bcq_mm, (x, lay.planes, lay.alphas, lay.offsets, lay.meta(), "lut",
                                           [1, 16, 64, 1, 4, 3], torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    sw = encode_sparse(parse_format("sparse:2:4+int4:g64"), torch.randn(N, K, generator=gen), random_24_mask(gen))
    sl = dispatch_ext.layout(sw)
    x = torch.randn(1, K, generator=gen).to(torch.bfloat16)
    torch.library.opcheck(ops_ext.sparse24_mm, (x, sl.inner.qa, sl.idx, sl.inner.scales, sl.inner.zeros, sl.meta(),
                                                "gemv", [1, 64, 64, 1, 4, 3], torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("spec", ["sparse:2:4+int4:g64", "sparse:2:4+int4:g128:sym", "sparse:2:4+int4:pc"])
def test_sparse24_as_dense_int4(ops_ext, spec, gen):
    """The "dense" path: the same weight as dense int4 (pruned positions at their group's zero point, groups twice
    the compact group) decodes to exactly the sparse weight's matrix, runs on "wa" where 512 inputs fit, and matches
    the fp32 reference through the dispatcher."""
    k = 512
    keep = torch.rand(N, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(N, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(N, k)
    cw = encode_sparse(parse_format(spec), torch.randn(N, k, generator=gen), mask)
    dense = dispatch_ext.dense_int4(cw)
    assert dense.format.bits == 4 and dense.format.group(k) == 2 * cw.inner.format.group(k // 2)
    assert torch.equal(dense.decode(), cw.decode())
    lay = dispatch_ext.dense_layout(cw)
    assert lay.qa is None and dispatch_ext.dense_layout(cw) is lay  # "wa" repack only; memoized
    cands = dispatch_ext.candidates(cw, dispatch_ext.layout(cw), 1, torch.bfloat16)
    assert ("dense", ()) in cands
    for m in (1, 5):
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        y = dispatch_ext.run_choice(("dense", ()), cw, dispatch_ext.layout(cw), x, torch.float32)
        assert relative_error(y, reference_fp32(cw, x)) <= TOL, f"{spec} m={m} (seed {gen.seed_})"


def test_sparse24_prepare_kernels(ops_ext, gen):
    """``prepare_kernels`` on a 2:4 + int4 module keeps only the dense int4 "wa" repack and matches the reference;
    float and BCQ weights are left alone."""
    from tensorslim.formats import CompressedLinear

    k = 512
    keep = torch.rand(N, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(N, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(N, k)
    cw = encode_sparse(parse_format("sparse:2:4+int4:g64"), torch.randn(N, k, generator=gen), mask)
    lin = CompressedLinear(cw)
    assert lin.prepare_kernels() and lin._kernel[0].qa is None and lin._kernel[1] is None
    x = torch.randn(3, k, generator=gen).to(torch.float16)
    assert relative_error(lin(x), reference_fp32(cw, x)) <= 2e-3
    bw = quantize_bcq(torch.randn(16, 64, generator=gen), parse_format("bcq2:g64"), rounds=1)
    assert not CompressedLinear(bw).prepare_kernels()
