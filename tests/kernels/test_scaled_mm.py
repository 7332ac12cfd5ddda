"""The opt-in FP8 x FP8 ``_scaled_mm`` path: equals the product of the quantized operands; never dispatched."""

from __future__ import annotations

import pytest
import torch

from tensorslim.errors import FormatError
from tensorslim.formats import parse_format
from tensorslim.formats.fp8 import quantize_fp8
from tensorslim.kernels import dispatch_ext
from tensorslim.kernels.reference import reference_fp32, relative_error
from tensorslim.kernels.scaled_mm import fp8_scaled_mm_linear, quantize_rows_e4m3


def test_scaled_mm_is_the_product_of_the_quantized_operands(gen):
    cw = quantize_fp8(torch.randn(48, 64, generator=gen), parse_format("fp8:e4m3"))
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    try:
        y = fp8_scaled_mm_linear(cw, x)
    except (RuntimeError, NotImplementedError) as e:  # CPU builds without fp8 _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable here: {e}")
    xq, sx = quantize_rows_e4m3(x)
    want = (xq.float() * sx) @ cw.decode().t()
    assert relative_error(y.float(), want) <= 4e-3, f"seed {gen.seed_}"  # bf16 output rounding
    assert relative_error(y.float(), reference_fp32(cw, x)) <= 0.1  # activation quantization: not 1e-3


def test_scaled_mm_is_opt_in_only(gen):
    cw = quantize_fp8(torch.randn(48, 64, generator=gen), parse_format("fp8:e4m3"))
    for m in (1, 16, 128):
        assert all(c[0] != "scaled_mm" for c in dispatch_ext.candidates(cw, dispatch_ext.ext_layout(cw), m,
                                                                       torch.bfloat16))
    with pytest.raises(FormatError):
        fp8_scaled_mm_linear(quantize_fp8(torch.randn(48, 64), parse_format("fp8:e4m3:g32")), torch.randn(1, 64))
