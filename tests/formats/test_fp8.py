import math

import pytest
import torch

from tensorslim.errors import FormatError, UnsupportedLayerError
from tensorslim.formats import FP8, parse_format
from tensorslim.formats.floatcodec import encode_fp8, minifloat_value
from tensorslim.formats.fp8 import quantize_fp8
from tensorslim.methods import build_method
from tensorslim.stats import LayerStats

from ._gridutil import check_storage


@pytest.mark.parametrize("kind,dtype,e,m,bias", [("e4m3", torch.float8_e4m3fn, 4, 3, 7), ("e5m2", torch.float8_e5m2, 5, 2, 15)])
def test_every_code_decodes_to_its_spec_value(kind, dtype, e, m, bias):
    got = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    for code in range(256):
        exp = (code >> m) & ((1 << e) - 1)
        man = code & ((1 << m) - 1)
        if kind == "e4m3" and exp == 15 and man == 7:
            assert math.isnan(got[code])  # the only NaN of e4m3fn; no infinities
            continue
        if kind == "e5m2" and exp == 31:
            assert math.isnan(got[code]) if man else math.isinf(got[code])
            continue
        assert got[code] == minifloat_value(code, exp_bits=e, man_bits=m, bias=bias), code


@pytest.mark.parametrize("kind,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_encode_is_nearest_even_and_saturating(kind, dtype):
    vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = torch.unique(vals[torch.isfinite(vals)]).double()
    x = torch.randn(4000, dtype=torch.float64) * float(grid.max()) / 3
    x = torch.cat([x, torch.tensor([1e9, -1e9]).double()])
    got = encode_fp8(x.float(), kind).double()
    # float64 reference: nearest grid value (ties are measure-zero for random inputs), saturating
    ref = grid[(x.clamp(grid.min(), grid.max()).unsqueeze(1) - grid).abs().argmin(1)]
    assert torch.equal(got, ref)
    # exact midpoints between two adjacent positive normals go to the even mantissa
    lo, hi = grid[grid > 1][0:2] if kind == "e4m3" else grid[grid > 1][0:2]
    mid = float((lo + hi) / 2)
    even = lo if (torch.tensor(float(lo)).to(dtype).view(torch.uint8) & 1) == 0 else hi
    assert float(encode_fp8(torch.tensor([mid]), kind)) == float(even)


@pytest.mark.parametrize("spec", ["fp8:e4m3", "fp8:e5m2", "fp8:e4m3:g32"])
def test_quantize_matches_float64_reference(spec):
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(24, 96) * torch.rand(24, 1) * 3
    fmt = parse_format(spec)
    assert fmt.spec() == spec
    cw = quantize_fp8(w, fmt)
    check_storage(cw)
    g = fmt.group(96)
    scale = w.double().reshape(24, -1, g).abs().amax(-1) / (448.0 if fmt.kind == "e4m3" else 57344.0)
    assert torch.allclose(cw.scales.double(), scale, rtol=1e-6)
    err = (cw.decode().double() - w.double()).abs()
    rel = 2.0 ** -(4 if fmt.kind == "e4m3" else 3)  # half an ulp of the mantissa for normal values
    tiny = (scale.repeat_interleave(g, 1) * 2.0 ** (-6 if fmt.kind == "e4m3" else -14))
    assert bool((err <= rel * w.double().abs() + tiny).all())
    assert fmt.nbytes((24, 96)) == 24 * 96 + 24 * (96 // g) * 4


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(FormatError):
        parse_format("fp8:e3m4")
    m = build_method("rtn", FP8(kind="e4m3", group_size=64))
    with pytest.raises(UnsupportedLayerError, match="not divisible"):
        m.apply(torch.randn(4, 96), LayerStats(n_tokens=0), layer="x")
    w = torch.randn(4, 64)
    w[0, 0] = float("nan")
    with pytest.raises(UnsupportedLayerError, match="non-finite"):
        m.apply(w, LayerStats(n_tokens=0), layer="x")


def test_every_grid_format_survives_a_checkpoint(tmp_path):
    from tensorslim.formats import CompressedLinear
    from tensorslim.io.checkpoint import load, save
    from tensorslim.models.adapter import get_adapter
    from tensorslim.models.tiny import tiny_model

    model = tiny_model("llama")
    specs = ["fp8:e4m3", "mxfp4", "mxfp8", "nvfp4", "nf4:g64", "ternary:g64", "bcq3:g64", "bipolar4:g32", "ternary"]
    for i, name in enumerate(get_adapter(model).linear_names(model)):
        lin = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        cw = build_method("rtn", parse_format(specs[i % len(specs)])).apply(lin.weight.detach(), LayerStats(), layer=name)
        setattr(model.get_submodule(parent), child, CompressedLinear.from_linear(lin, cw, method="rtn"))
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
        save(model, tmp_path / "ckpt")
        again, _ = load(tmp_path / "ckpt")
        assert torch.equal(again(ids).logits, ref)
