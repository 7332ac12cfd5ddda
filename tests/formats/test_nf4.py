import pytest
import torch

from tensorslim.errors import FormatError, UnsupportedLayerError
from tensorslim.formats import NF4, parse_format
from tensorslim.formats.nf4 import NF4_LEVELS, quantize_nf4
from tensorslim.formats.packing import unpack_codes
from tensorslim.methods import build_method
from tensorslim.stats import LayerStats

from ._gridutil import check_storage


def test_codebook_is_the_qlora_table():
    assert NF4_LEVELS.numel() == 16 and NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[15] == 1
    assert bool((NF4_LEVELS[1:] > NF4_LEVELS[:-1]).all())
    # levels are normal quantiles: the positive half is denser near 0 than a uniform grid
    assert float(NF4_LEVELS[8]) < 1 / 8


@pytest.mark.parametrize("spec", ["nf4:g64", "nf4:pc", "nf4:g32:float32"])
def test_quantize_picks_the_nearest_level(spec):
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    fmt = parse_format(spec)
    assert fmt.spec() == spec
    cw = quantize_nf4(w, fmt)
    check_storage(cw)
    g = fmt.group(128)
    s = cw.scales.double()
    x = w.double().reshape(16, -1, g) / s.unsqueeze(-1)
    ref = (x.unsqueeze(-1) - NF4_LEVELS.double()).abs().argmin(-1).reshape(16, 128)  # float64 brute force
    assert torch.equal(unpack_codes(cw.codes, 4, 128), ref)
    assert torch.allclose(s, w.double().reshape(16, -1, g).abs().amax(-1), rtol=1e-3)
    dec = (NF4_LEVELS.double()[ref].reshape(16, -1, g) * s.unsqueeze(-1)).reshape(16, 128)
    assert torch.allclose(cw.decode().double(), dec, rtol=1e-7, atol=0)


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(FormatError):
        parse_format("nf3:g64")
    with pytest.raises(UnsupportedLayerError, match="not divisible"):
        build_method("rtn", NF4(group_size=64)).apply(torch.randn(2, 96), LayerStats(), layer="x")
