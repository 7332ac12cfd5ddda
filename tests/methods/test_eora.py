import pytest
import torch

from tensorslim.errors import CalibrationError, ConfigError, UnsupportedLayerError
from tensorslim.formats import IntGroup, LowRank, Sum, parse_format, quantize_rtn
from tensorslim.methods.eora import EoRA, parse_compensate
from tensorslim.methods.lowrank import weighted_error, weighted_lowrank
from tensorslim.stats import LayerStats


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


def _case(g, out=64, inp=64, tokens=300):
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) * torch.logspace(-1.5, 1, inp, dtype=torch.float64)
    return w, x, LayerStats(n_tokens=tokens, gram=(x.T @ x).float())


def test_parse_compensate():
    assert parse_compensate("eora:r32") == EoRA(rank=32)
    assert parse_compensate("EoRA:r8:damp=0.01:float32") == EoRA(rank=8, damp=0.01, dtype="float32")
    assert parse_compensate(EoRA(rank=4, damp=0.5).spec()) == EoRA(rank=4, damp=0.5)
    for bad in ("eora", "eora:r0", "lora:r8", "eora:r8:damp=x", "eora:r8:int4"):
        with pytest.raises(ConfigError):
            parse_compensate(bad)


def test_eora_builds_a_sum_and_beats_plain_svd_of_the_residual():
    g = _seed()
    w, x, st = _case(g)
    h = x.T @ x
    base = quantize_rtn(w, IntGroup(bits=2, group_size=32))
    resid = w.double() - base.decode().double()
    prev = weighted_error(w, base.decode(), h)
    for r in (4, 16, 32):
        cw = EoRA(rank=r, dtype="float32").apply(w, base, st, layer="l")
        assert cw.format == Sum(base=base.format, extra=LowRank(rank=r, dtype="float32"))
        assert cw.format == parse_format(cw.format.spec())
        assert cw.nbytes == base.nbytes + r * 128 * 4
        assert torch.equal(cw.base.decode(), base.decode())
        e = weighted_error(w, cw.decode(), h)
        up, vp = weighted_lowrank(resid, r)
        e_plain = weighted_error(resid, up.double() @ vp.double(), h)
        assert e <= e_plain * (1 + 1e-5)
        assert e <= prev * (1 + 1e-6)  # non-increasing in r
        prev = e
    # full rank: the residual is recovered exactly
    full = EoRA(rank=64, dtype="float32").apply(w, base, st)
    assert torch.allclose(full.decode().double(), w.double(), atol=1e-3)


def test_eora_isotropic_is_plain_svd_of_residual():
    g = _seed()
    w = torch.randn(24, 40, generator=g)
    st = LayerStats(n_tokens=5, gram=5 * torch.eye(40))
    base = quantize_rtn(w, IntGroup(bits=3, group_size=8))
    cw = EoRA(rank=6, dtype="float32").apply(w, base, st)
    u, v = weighted_lowrank(w.double() - base.decode().double(), 6)
    ref = u.double() @ v.double()
    assert float((cw.extra.decode().double() - ref).norm() / ref.norm()) < 1e-5


def test_eora_bad_inputs():
    g = _seed()
    w, x, st = _case(g, out=16, inp=32)
    base = quantize_rtn(w, IntGroup(bits=4, group_size=16))
    with pytest.raises(UnsupportedLayerError):
        EoRA(rank=17).apply(w, base, st)
    with pytest.raises(CalibrationError):
        EoRA(rank=4).apply(w, base, LayerStats())
    bad = LayerStats(n_tokens=3, gram=torch.full((32, 32), float("nan")))
    with pytest.raises(CalibrationError):
        EoRA(rank=4).apply(w, base, bad)
    with pytest.raises(ConfigError):
        EoRA(rank=0)
