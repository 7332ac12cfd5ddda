import pytest
import torch

from tensorslim.errors import ConfigError, FormatError
from tensorslim.formats import IntGroup, Sum, SumWeight, format_from_dict, parse_format, quantize_rtn, weight_class
from tensorslim.formats.outliers import SparseOutliers, SparseOutliersWeight, encode_outliers


def test_spec_parse_and_dict_roundtrip():
    f = parse_format("int3:g64+outliers:0.01")
    assert f == Sum(base=IntGroup(bits=3, group_size=64), extra=SparseOutliers(fraction=0.01))
    assert parse_format("outliers:1%") == SparseOutliers(fraction=0.01)
    assert parse_format("outliers:0.005:float32") == SparseOutliers(fraction=0.005, value_dtype="float32")
    assert parse_format(f.spec()) == f and format_from_dict(f.to_dict()) == f
    with pytest.raises(FormatError):
        parse_format("outliers:abc")
    with pytest.raises(ConfigError):
        SparseOutliers(fraction=0.9)


def test_nbytes_counts_indices_and_values():
    f = SparseOutliers(fraction=0.01)
    assert f.per_row(576) == 6
    assert f.nbytes((10, 576)) == 10 * 6 * 4  # int16 index + fp16 value
    assert SparseOutliers(fraction=0.01).nbytes((2, 40000)) == 2 * 400 * 6  # int32 index beyond 32767 inputs
    s = Sum(base=IntGroup(bits=4, group_size=64), extra=f)
    assert s.nbytes((10, 576)) == IntGroup(bits=4, group_size=64).nbytes((10, 576)) + 240


def test_decode_and_state_roundtrip_exact():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = torch.randn(12, 200, generator=gen)
    fmt = SparseOutliers(fraction=0.02)
    k = fmt.per_row(200)
    idx = torch.argsort(torch.rand(12, 200, generator=gen), dim=1)[:, :k]
    cw = encode_outliers(fmt, w, idx)
    d = cw.decode()
    mask = torch.zeros(12, 200, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(d[mask], w.half().float()[mask]) and torch.all(d[~mask] == 0)
    assert cw.nbytes == fmt.nbytes((12, 200))
    back = SparseOutliersWeight.from_tensors(fmt, (12, 200), cw.tensors())
    assert torch.equal(back.decode(), d)
    # inside a Sum with an integer base
    base = quantize_rtn(w, IntGroup(bits=3, group_size=40))
    sf = Sum(base=base.format, extra=fmt)
    sw = SumWeight(format=sf, shape=(12, 200), base=base, extra=cw)
    sw.validate()
    again = weight_class(sf).from_tensors(sf, (12, 200), sw.tensors())
    assert torch.equal(again.decode(), base.decode() + d)
    x = torch.randn(3, 200, generator=gen)
    assert torch.allclose(sw.linear(x), x @ (base.decode() + d).T, atol=1e-4)


def test_repeated_index_rejected():
    fmt = SparseOutliers(fraction=0.1)
    idx = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ConfigError):
        encode_outliers(fmt, torch.randn(2, 20), idx)
