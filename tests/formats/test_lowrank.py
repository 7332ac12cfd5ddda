import pytest
import torch

from tensorslim.errors import ConfigError, FormatError, UnsupportedLayerError
from tensorslim.formats import (CompressedLinear, IntGroup, LowRank, LowRankWeight, Sum, SumWeight, format_from_dict,
                                parse_format, quantize_rtn, weight_class)


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


@pytest.mark.parametrize("spec", ["lowrank:r64", "lowrank:0.3", "lowrank:r8:float32", "lowrank:0.25:bfloat16"])
def test_spec_roundtrip(spec):
    f = parse_format(spec)
    assert isinstance(f, LowRank)
    assert parse_format(f.spec()) == f
    assert format_from_dict(f.to_dict()) == f


@pytest.mark.parametrize("bad", ["lowrank:", "lowrank:r0", "lowrank:1.5", "lowrank:r8:int8", "lowrank:0"])
def test_bad_specs(bad):
    with pytest.raises((FormatError, ConfigError)):
        parse_format(bad)


def test_config_validation():
    with pytest.raises(ConfigError):
        LowRank()
    with pytest.raises(ConfigError):
        LowRank(rank=4, reduction=0.3)
    with pytest.raises(ConfigError):
        LowRank(rank=-1)


def test_nbytes_counts_factor_dtype():
    assert LowRank(rank=16).nbytes((96, 64)) == 16 * (96 + 64) * 2
    assert LowRank(rank=16, dtype="float32").nbytes((96, 64)) == 16 * (96 + 64) * 4
    # reduction: the uniform rank removing 30% of the parameters
    k = LowRank(reduction=0.3).rank_for((96, 64))
    assert k == int(0.7 * 96 * 64 / 160)
    assert k * 160 <= 0.7 * 96 * 64 < (k + 1) * 160


def test_rank_too_large_is_unsupported():
    f = LowRank(rank=65)
    assert f.supports((96, 64)) is not None
    with pytest.raises(UnsupportedLayerError, match="rank 65"):
        f.check((96, 64), "layer.x")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_linear_and_roundtrip(dtype):
    g = _seed()
    u, v = torch.randn(40, 6, generator=g), torch.randn(6, 24, generator=g)
    w = LowRankWeight.from_factors(LowRank(rank=6, dtype=dtype), u, v)
    assert w.nbytes == LowRank(rank=6, dtype=dtype).nbytes((40, 24))
    ref = u.double() @ v.double()
    tol = 1e-5 if dtype == "float32" else 3e-3
    assert torch.allclose(w.decode().double(), ref, rtol=tol, atol=tol * ref.abs().max())
    x, bias = torch.randn(3, 5, 24, generator=g), torch.randn(40, generator=g)
    y = w.linear(x, bias)
    y_ref = x.double() @ w.decode().double().T + bias.double()
    assert y.shape == (3, 5, 40)
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-4 * y_ref.abs().max())
    again = weight_class(w.format).from_tensors(w.format, w.shape, w.tensors())
    assert torch.equal(again.decode(), w.decode())
    mod = CompressedLinear(w, bias)
    assert torch.allclose(mod(x), y)


def test_sum_base_plus_lowrank_decodes_to_sum():
    g = _seed()
    base = quantize_rtn(torch.randn(32, 64, generator=g), IntGroup(bits=3, group_size=32))
    lr = LowRankWeight.from_factors(LowRank(rank=4, dtype="float32"), torch.randn(32, 4, generator=g),
                                    torch.randn(4, 64, generator=g))
    fmt = parse_format(f"{base.format.spec()}+{lr.format.spec()}")
    assert fmt == Sum(base=base.format, extra=lr.format)
    s = SumWeight(format=fmt, shape=(32, 64), base=base, extra=lr)
    s.validate()
    ref = base.decode().double() + lr.u.double() @ lr.v.double()
    assert torch.allclose(s.decode().double(), ref, atol=1e-5)
    x = torch.randn(7, 64, generator=g)
    assert torch.allclose(s.linear(x).double(), x.double() @ ref.T, rtol=1e-4, atol=1e-4)
    assert s.nbytes == fmt.nbytes((32, 64)) == base.nbytes + lr.nbytes
    again = SumWeight.from_tensors(fmt, (32, 64), s.tensors())
    assert torch.equal(again.decode(), s.decode())


def test_validate_rejects_wrong_factors():
    with pytest.raises(FormatError):
        LowRankWeight.from_factors(LowRank(rank=4), torch.randn(8, 4), torch.randn(3, 8))
