import pytest
import torch

from tensorslim.errors import ConfigError, FormatError, UnsupportedLayerError
from tensorslim.formats import Monarch, MonarchWeight, format_from_dict, parse_format, weight_class


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


@pytest.mark.parametrize("spec", ["monarch:b4", "monarch:b4:r3", "monarch:b8:float32"])
def test_spec_roundtrip(spec):
    f = parse_format(spec)
    assert isinstance(f, Monarch) and parse_format(f.spec()) == f and format_from_dict(f.to_dict()) == f


@pytest.mark.parametrize("bad", ["monarch:", "monarch:b0", "monarch:4"])
def test_bad_specs(bad):
    with pytest.raises((FormatError, ConfigError)):
        parse_format(bad)


def test_nbytes_and_supports():
    assert Monarch(blocks=4, rank=2).nbytes((48, 32)) == 4 * 2 * 80 * 2
    with pytest.raises(UnsupportedLayerError):
        Monarch(blocks=5).check((48, 32), "x")
    with pytest.raises(UnsupportedLayerError, match="rank"):
        Monarch(blocks=4, rank=9).check((48, 32), "x")  # slices are 12 x 8


def _dense_reference(lb, rb, b, r, shape):
    """W[l*s+q, k*p+j] = sum_t L[l,q,k*r+t] R[k,l*r+t,j], written as explicit loops over block pairs."""
    s, p = shape[0] // b, shape[1] // b
    w = torch.zeros(shape, dtype=torch.float64)
    for l in range(b):
        for k in range(b):
            w[l * s:(l + 1) * s, k * p:(k + 1) * p] = lb[l, :, k * r:(k + 1) * r].double() @ rb[k, l * r:(l + 1) * r, :].double()
    return w


@pytest.mark.parametrize("shape,b,r", [((16, 16), 4, 1), ((48, 32), 4, 2), ((12, 18), 3, 3), ((8, 8), 1, 2)])
def test_decode_and_linear_match_block_reference(shape, b, r):
    g = _seed()
    s, p = shape[0] // b, shape[1] // b
    lb, rb = torch.randn(b, s, b * r, generator=g), torch.randn(b, b * r, p, generator=g)
    w = MonarchWeight.from_factors(Monarch(blocks=b, rank=r, dtype="float32"), shape, lb, rb)
    ref = _dense_reference(lb, rb, b, r, shape)
    assert torch.allclose(w.decode().double(), ref, atol=1e-5)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, shape[1], generator=g)
        bias = torch.randn(shape[0], generator=g)
        assert torch.allclose(w.linear(x, bias).double(), x.double() @ ref.T + bias.double(), atol=1e-4)
    again = weight_class(w.format).from_tensors(w.format, w.shape, w.tensors())
    assert torch.equal(again.decode(), w.decode())
