import pytest
import torch

from tensorslim.errors import ConfigError, FormatError, UnsupportedLayerError
from tensorslim.formats import Kronecker, KroneckerWeight, format_from_dict, parse_format, weight_class
from tensorslim.formats.kronecker import balanced_divisor


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


@pytest.mark.parametrize("spec", ["kron:t4", "kron:t2:24x24", "kron:t1:float32"])
def test_spec_roundtrip(spec):
    f = parse_format(spec)
    assert isinstance(f, Kronecker) and parse_format(f.spec()) == f and format_from_dict(f.to_dict()) == f


@pytest.mark.parametrize("bad", ["kron:", "kron:t0", "kron:t2:3", "kron:t2:float8"])
def test_bad_specs(bad):
    with pytest.raises((FormatError, ConfigError)):
        parse_format(bad)


def test_balanced_divisor_and_nbytes():
    assert balanced_divisor(576) == 24 and balanced_divisor(1536) == 32 and balanced_divisor(7) == 1
    f = Kronecker(terms=3)
    assert f.factor_shapes((576, 1536)) == (24, 32, 24, 48)
    assert f.nbytes((576, 1536)) == 3 * (24 * 32 + 24 * 48) * 2
    assert Kronecker(terms=3, dtype="float32").nbytes((576, 1536)) == 3 * (24 * 32 + 24 * 48) * 4


def test_unsupported_shapes():
    with pytest.raises(UnsupportedLayerError):
        Kronecker(terms=2, m1=5, n1=4).check((12, 8), "x")
    with pytest.raises(UnsupportedLayerError, match="terms"):
        Kronecker(terms=10, m1=3, n1=2).check((6, 4), "x")  # min(m1 n1, m2 n2) = 4


@pytest.mark.parametrize("shape,m1,n1,terms", [((12, 20), 3, 4, 2), ((36, 16), 6, 4, 5), ((8, 9), 2, 3, 1)])
def test_decode_is_kron_sum_and_linear_matches(shape, m1, n1, terms):
    g = _seed()
    m2, n2 = shape[0] // m1, shape[1] // n1
    b, c = torch.randn(terms, m1, n1, generator=g), torch.randn(terms, m2, n2, generator=g)
    w = KroneckerWeight.from_factors(Kronecker(terms=terms, m1=m1, n1=n1, dtype="float32"), shape, b, c)
    ref = sum(torch.kron(b[t].double(), c[t].double()) for t in range(terms))
    assert torch.allclose(w.decode().double(), ref, atol=1e-5)
    for batch in (1, 3, 7):
        x = torch.randn(batch, shape[1], generator=g)
        bias = torch.randn(shape[0], generator=g)
        assert torch.allclose(w.linear(x, bias).double(), x.double() @ ref.T + bias.double(), atol=1e-4)
    again = weight_class(w.format).from_tensors(w.format, w.shape, w.tensors())
    assert torch.equal(again.decode(), w.decode())
    assert w.nbytes == w.format.nbytes(shape)
