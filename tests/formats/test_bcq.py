import pytest
import torch

from tensorslim.errors import ConfigError, FormatError
from tensorslim.formats import BCQ, IntGroup, parse_format, quantize_rtn
from tensorslim.formats.bcq import bcq_from_intgroup, fit_bcq, quantize_bcq

from ._gridutil import check_storage


def test_alternating_fit_never_increases_the_error():
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(300, 64) * torch.rand(300, 1) + torch.randn(300, 1) * 0.3
    for q in (1, 2, 3):
        _, _, _, hist = fit_bcq(w, q, rounds=6)
        assert all(b <= a * (1 + 1e-5) + 1e-6 for a, b in zip(hist, hist[1:])), hist
        assert hist[-1] < hist[0]


def test_quantize_error_falls_with_bits_and_round_trips():
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(32, 128)
    errs = []
    for q in (1, 2, 3, 4):
        fmt = parse_format(f"bcq{q}:g64")
        assert fmt.spec() == f"bcq{q}:g64"
        cw = quantize_bcq(w, fmt, rounds=5)
        check_storage(cw)
        errs.append(float(((cw.decode() - w) ** 2).sum() / (w**2).sum()))
    assert errs == sorted(errs, reverse=True) and errs[2] < 0.05


@pytest.mark.parametrize("spec", ["int3:g64", "int4:g32", "int2:pc", "int8:g64", "int4:g64:bfloat16"])
def test_int_to_bcq_is_exact(spec):
    torch.manual_seed(torch.seed() % 2**31)
    w = torch.randn(24, 128) * torch.rand(24, 1) * 5
    iw = quantize_rtn(w, parse_format(spec))
    bw = bcq_from_intgroup(iw)
    check_storage(bw)
    assert torch.equal(bw.decode(), iw.decode())
    assert bw.format.bits == iw.format.bits


def test_bad_inputs_raise_typed_errors():
    for bad in ("bcq9:g64", "bcq:g64", "bcq3:x"):
        with pytest.raises(FormatError):
            parse_format(bad)
    with pytest.raises(ConfigError):
        BCQ(bits=0)
    iw = quantize_rtn(torch.randn(4, 64), IntGroup(bits=4, group_size=32))
    import dataclasses
    act = dataclasses.replace(iw, perm=torch.arange(64, dtype=torch.int16))
    with pytest.raises(ConfigError, match="act-order"):
        bcq_from_intgroup(act)
