"""FP8 / MXFP4 / MXFP8 / NVFP4 kernels (Triton interpreter, CPU) against ``x @ decode()^T`` in fp32, poisoned outputs.

GEMV runs with bf16 activations, the tensor-core GEMM with fp16 (the interpreter mishandles bf16 ``tl.dot``; the
bf16 GEMM, including the pre-scaled MX tile, is checked on the GPU by ``bench/kernels.py --new-formats``; here the
pre-scaled tile runs with fp16 activations, exact for these magnitudes). 40 outputs (not a multiple of any tile).
"""

from __future__ import annotations

import pytest
import torch

from tensorslim.formats import parse_format
from tensorslim.formats.fp8 import quantize_fp8
from tensorslim.formats.mx import quantize_mx, quantize_nvfp4
from tensorslim.kernels import dispatch, dispatch_ext
from tensorslim.kernels.reference import reference_fp32, relative_error

TOL = 1e-3
N, K = 40, 128
QUANT = {"fp8": quantize_fp8, "mxfp": quantize_mx, "nvfp": quantize_nvfp4}
# (spec, gemv cases, gemm cases); cases are (rows, config); config = (BM, BN, BK, SPLIT_K, warps, stages)
CASES = [
    ("fp8:e4m3", [(1, (1, 64, 128, 1, 4, 3)), (7, (1, 32, 32, 2, 4, 3))], [(3, (16, 32, 64, 1, 4, 3))]),
    ("fp8:e5m2:g64", [(2, (1, 64, 64, 1, 4, 3))], [(16, (16, 64, 64, 2, 4, 3))]),
    ("mxfp4", [(1, (1, 32, 64, 2, 4, 3)), (16, (1, 64, 64, 1, 4, 3))], [(2, (16, 16, 32, 1, 4, 3))]),
    ("mxfp8", [(3, (1, 64, 64, 1, 4, 3))], [(33, (32, 32, 32, 2, 4, 3))]),
    ("nvfp4", [(1, (1, 64, 64, 1, 4, 3)), (2, (1, 32, 128, 1, 4, 3))], [(7, (16, 64, 64, 1, 4, 3)),
                                                                       (33, (16, 64, 16, 4, 4, 3))]),
]


def weight(spec: str, gen: torch.Generator):
    w = torch.randn(N, K, generator=gen)
    w[::3, 5] *= 300.0  # outliers: other elements of those rows/blocks become subnormal codes
    fmt = parse_format(spec)
    return QUANT[fmt.family](w, fmt)


def run_poisoned(ops, cw, x, path, config, force_pre_scale=None):
    lay = dispatch_ext.layout(cw)
    out = torch.zeros(x.shape[0], N) if config[3] > 1 else torch.full((x.shape[0], N), float("nan"))
    ops.launch_float_mm(x, lay.q, lay.scales, lay.global_scale, lay.meta(), path, list(config), out,
                        force_pre_scale=force_pre_scale)
    return out


@pytest.fixture(scope="module")
def ops_ext(ops):
    from tensorslim.kernels import ops_ext as mod

    return mod


@pytest.mark.parametrize("spec,gemv,gemm", CASES, ids=[c[0] for c in CASES])
def test_float_kernels_match_reference(ops_ext, spec, gemv, gemm, gen):
    cw = weight(spec, gen)
    assert dispatch.kernel_reason(cw) is None
    for m, config in gemv:
        x = torch.randn(m, K, generator=gen).to(torch.bfloat16)
        err = relative_error(run_poisoned(ops_ext, cw, x, "gemv", config), reference_fp32(cw, x))
        assert err <= TOL, f"{spec} gemv m={m} {config}: {err:.2e} (seed {gen.seed_})"
    for m, config in gemm:
        x = torch.randn(m, K, generator=gen).to(torch.float16)
        err = relative_error(run_poisoned(ops_ext, cw, x, "gemm", config), reference_fp32(cw, x))
        assert err <= TOL, f"{spec} gemm m={m} {config}: {err:.2e} (seed {gen.seed_})"


def test_mx_pre_scaled_tile(ops_ext, gen):
    """The tile that multiplies E8M0 scales in before the dot (bf16 on the GPU), with several blocks a tile."""
    cw = quantize_mx(torch.randn(N, K, generator=gen), parse_format("mxfp4"))
    x = torch.randn(5, K, generator=gen).to(torch.float16)
    err = relative_error(run_poisoned(ops_ext, cw, x, "gemm", (16, 64, 128, 1, 4, 3), True), reference_fp32(cw, x))
    assert err <= TOL, f"{err:.2e} (seed {gen.seed_})"


def test_dispatch_picks_kernel_with_bias_and_batch_dims(ops_ext, gen):
    cw = quantize_nvfp4(torch.randn(N, 64, generator=gen), parse_format("nvfp4"))
    bias = torch.randn(N, generator=gen)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    y = dispatch.kernel_linear(cw, x, bias, out_dtype=torch.float32)  # first candidate: gemv for 6 rows
    assert y.shape == (2, 3, N)
    err = relative_error(y, reference_fp32(cw, x, bias))
    assert err <= TOL, f"{err:.2e} (seed {gen.seed_})"


def test_reasons_and_cpu_reference(gen):
    cw = weight("fp8:e4m3", gen)
    x = torch.randn(2, K, generator=gen)
    assert "dtype" in dispatch.kernel_reason(cw, x)
    assert torch.equal(cw.linear(x), torch.nn.functional.linear(x, cw.decode()))  # CPU fp32: the reference
    odd = quantize_mx(torch.randn(8, 48, generator=gen), parse_format("mxfp4:b16"))
    assert "multiple of 32" in dispatch.kernel_reason(odd)
    small = quantize_fp8(torch.randn(8, 64, generator=gen), parse_format("fp8:e4m3:g8"))
    assert "multiple of 16" in dispatch.kernel_reason(small)


def test_float_mm_op_registration(ops_ext, gen):
    cw = quantize_mx(torch.randn(N, 64, generator=gen), parse_format("mxfp4"))
    lay = dispatch_ext.layout(cw)
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
    args = (x, lay.q, lay.scales, lay.global_scale, lay.meta(), "gemv", [1, 64, 64, 1, 4, 3], torch.float32)
    torch.library.opcheck(ops_ext.float_mm, args, test_utils=("test_schema", "test_faketensor"))
