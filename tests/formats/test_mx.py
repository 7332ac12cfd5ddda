import math

import pytest
import torch

from tensorslim.errors import FormatError, UnsupportedLayerError
from tensorslim.formats import MXFP, NVFP4, parse_format
from tensorslim.formats.floatcodec import decode_e2m1, decode_e8m0, encode_e2m1, minifloat_value
from tensorslim.formats.mx import quantize_mx, quantize_nvfp4
from tensorslim.formats.packing import unpack_codes
from tensorslim.methods import build_method
from tensorslim.stats import LayerStats

from ._gridutil import check_storage

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def test_every_e2m1_code_decodes_to_its_spec_value():
    got = decode_e2m1(torch.arange(16))
    for code in range(16):
        assert float(got[code]) == minifloat_value(code, exp_bits=2, man_bits=1, bias=1)
    assert torch.equal(encode_e2m1(got), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]))


def test_e2m1_rounding_ties_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.25, -5.0, 0.26, 4.9])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.0, -4.0, 0.5, 4.0])
    assert torch.equal(decode_e2m1(encode_e2m1(x)), want)
    r = torch.randn(5000, dtype=torch.float64) * 3
    ref = torch.sign(r) * E2M1_GRID[(r.abs().clamp(max=6).unsqueeze(1) - E2M1_GRID).abs().argmin(1)]
    assert torch.equal(decode_e2m1(encode_e2m1(r.float())).double(), ref)


def test_e8m0_codes_are_powers_of_two():
    codes = torch.arange(255, dtype=torch.uint8)
    assert torch.equal(decode_e8m0(codes).double(), 2.0 ** (torch.arange(255, dtype=torch.float64) - 127))
    assert math.isnan(decode_e8m0(torch.tensor([255], dtype=torch.uint8)))


@pytest.mark.parametrize("spec,emax", [("mxfp4", 2), ("mxfp8", 8), ("mxfp8:e5m2", 15)])
def test_mx_block_scales_follow_the_ocp_rule(spec, emax):
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(16, 128) * torch.logspace(-3, 2, 16).unsqueeze(1)
    w[3, :32] = 0.0  # an all-zero block
    fmt = parse_format(spec)
    assert fmt.spec() == spec
    cw = quantize_mx(w, fmt)
    check_storage(cw)
    amax = w.double().reshape(16, 4, 32).abs().amax(-1)
    for r in range(16):
        for b in range(4):
            a = float(amax[r, b])
            want = 2.0 ** (math.floor(math.log2(a)) - emax) if a > 0 else 2.0**-127
            assert float(decode_e8m0(cw.scales[r, b])) == want
    # elements are on the element grid: decode / scale is representable
    x = cw.decode().reshape(16, 4, 32) / decode_e8m0(cw.scales).unsqueeze(-1)
    if fmt.element == "e2m1":
        assert bool(torch.isin(x.abs().double(), E2M1_GRID).all())
        assert torch.equal(decode_e2m1(unpack_codes(cw.codes, 4, 128)).reshape(16, 4, 32), x)
    else:
        assert torch.equal(x.to(cw.codes.dtype).float(), x)
    assert cw.decode()[3, :32].abs().max() == 0


def test_nvfp4_two_level_scaling_round_trips():
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(32, 64) * torch.rand(32, 1) * 4
    cw = quantize_nvfp4(w, NVFP4())
    check_storage(cw)
    g = float(cw.global_scale)
    assert g == pytest.approx(448 * 6 / float(w.abs().max()), rel=1e-6)
    sb = cw.scales.float()
    assert torch.equal(sb.to(torch.float8_e4m3fn).float(), sb)  # E4M3-representable
    ref_sb = (w.double().reshape(32, 4, 16).abs().amax(-1) / 6 * g)
    assert torch.allclose(sb.double(), ref_sb, rtol=2.0**-3)  # within E4M3 rounding
    # decode = E2M1 codes * (s_b / g), and re-encoding the decoded matrix reproduces it exactly
    p = decode_e2m1(unpack_codes(cw.codes, 4, 64)).reshape(32, 4, 16)
    assert torch.equal(cw.decode(), (p * (sb / cw.global_scale).unsqueeze(-1)).reshape(32, 64))
    again = quantize_nvfp4(cw.decode(), NVFP4())
    assert torch.allclose(again.decode(), cw.decode(), rtol=1e-6, atol=0)
    # the 16-block E4M3 scale is finer than MX's 32-block power of two on Gaussian weights
    mx = quantize_mx(w, MXFP())
    e_nv = float(((cw.decode() - w) ** 2).sum())
    e_mx = float(((mx.decode() - w) ** 2).sum())
    assert e_nv < e_mx
    assert cw.bits_per_weight == pytest.approx(4 + 8 / 16 + 32 / (32 * 64))


def test_bad_inputs_raise_typed_errors():
    for bad in ("mxfp4:e5m2", "mxfp6", "nvfp8", "mxfp4:b0x"):
        with pytest.raises(FormatError):
            parse_format(bad)
    for fmt in (MXFP(), NVFP4()):
        m = build_method("rtn", fmt)
        with pytest.raises(UnsupportedLayerError, match="not divisible"):
            m.apply(torch.randn(4, 40), LayerStats(), layer="x")
        w = torch.randn(4, 64)
        w[1, 2] = float("inf")
        with pytest.raises(UnsupportedLayerError, match="non-finite"):
            m.apply(w, LayerStats(), layer="x")
