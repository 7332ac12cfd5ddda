import pytest
import torch

from tensorslim.errors import FormatError
from tensorslim.formats import Bipolar, parse_format, quantize_rtn
from tensorslim.formats.bipolar import bipolar_dot, bipolar_from_intgroup, quantize_bipolar

from ._gridutil import check_storage


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g32", "int8:pc", "int1:g64"])
def test_int_to_bipolar_is_exact(spec):
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(16, 128) * torch.rand(16, 1) * 3
    iw = quantize_rtn(w, parse_format(spec))
    bw = bipolar_from_intgroup(iw)
    check_storage(bw)
    assert torch.equal(bw.decode(), iw.decode())
    v = bw.values()
    assert bool((v % 2 != 0).all()) and int(v.abs().max()) <= (1 << iw.format.bits) - 1


def test_bit_plane_linear_matches_float64_reference():
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(48, 128)
    fmt = parse_format("bipolar4:g64")
    assert fmt == Bipolar(bits=4, group_size=64) and fmt.spec() == "bipolar4:g64"
    bw = quantize_bipolar(w, fmt)
    x = torch.randn(3, 5, 128)
    b = torch.randn(48)
    ref = x.double() @ bw.decode().double().T + b.double()
    got = bw.linear(x, b)
    assert got.shape == (3, 5, 48)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_popcount_identity():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    b = torch.randint(0, 2, (50, 77), generator=g)
    c = torch.randint(0, 2, (50, 77), generator=g)
    assert torch.equal(bipolar_dot(b, c), ((2 * b - 1) * (2 * c - 1)).sum(-1))


def test_bad_spec():
    with pytest.raises(FormatError):
        parse_format("bipolar0:g64")
