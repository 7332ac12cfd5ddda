import pytest
import torch

from tensorslim.errors import FormatError, UnsupportedLayerError
from tensorslim.formats import Ternary, parse_format
from tensorslim.formats.ternary import quantize_ternary
from tensorslim.methods import build_method
from tensorslim.stats import LayerStats

from ._gridutil import check_storage


@pytest.mark.parametrize("spec", ["ternary", "ternary:g64"])
def test_absmean_ternary_matches_float64_reference(spec):
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(8, 128) * torch.rand(8, 1)
    fmt = parse_format(spec)
    assert fmt.spec() == spec
    cw = quantize_ternary(w, fmt)
    check_storage(cw)
    wd = w.double()
    if fmt.group_size is None:
        s = wd.abs().mean().expand(8, 1, 128)
        assert float(cw.scales) == pytest.approx(float(wd.abs().mean()), rel=1e-6)
        x = wd.reshape(8, 1, 128)
    else:
        x = wd.reshape(8, 2, 64)
        s = cw.scales.double().unsqueeze(-1)  # fp16-rounded absmean
        assert torch.allclose(cw.scales.double(), x.abs().mean(-1), rtol=1e-3)
    t = torch.clamp(torch.round(x / s), -1, 1).reshape(8, 128)
    assert torch.equal(cw.trits().double(), t)
    assert set(cw.trits().unique().tolist()) <= {-1, 0, 1}
    assert torch.allclose(cw.decode().double(), (t.reshape(x.shape) * s).reshape(8, 128), rtol=1e-6)
    assert cw.bits_per_weight == pytest.approx(2 + (32 / 1024 if fmt.group_size is None else 16 / 64))


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(FormatError):
        parse_format("ternary:64")
    with pytest.raises(UnsupportedLayerError):
        build_method("rtn", Ternary(group_size=64)).apply(torch.randn(2, 100), LayerStats(), layer="x")
