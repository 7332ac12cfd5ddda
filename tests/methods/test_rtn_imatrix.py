import pytest
import torch

from tensorslim.errors import CalibrationError, ConfigError
from tensorslim.formats import IntGroup, quantize_rtn
from tensorslim.methods import build_method
from tensorslim.methods.rtn_imatrix import RTNImatrix, rtn_imatrix_quantize
from tensorslim.stats import LayerStats


def _setup(out=24, inp=128):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = torch.randn(out, inp, generator=gen) * 0.02
    w[torch.rand(out, inp, generator=gen) < 0.02] *= 10
    imp = torch.rand(inp, generator=gen).pow(4) * 100
    return w, imp


def _werr(w, wh, imp):
    return float((((w.double() - wh.double()) ** 2) * imp.double()).sum())


@pytest.mark.parametrize("fmt", [IntGroup(bits=3, group_size=32), IntGroup(bits=4, group_size=None),
                                 IntGroup(bits=3, group_size=32, symmetric=True)], ids=lambda f: f.spec())
def test_weighted_error_not_above_rtn_and_lower(fmt):
    w, imp = _setup()
    cw = rtn_imatrix_quantize(w, imp, fmt)
    e, r = _werr(w, cw.decode(), imp), _werr(w, quantize_rtn(w, fmt).decode(), imp)
    assert e <= r * (1 + 1e-6)
    assert e < 0.97 * r


def test_uniform_importance_single_candidate_is_rtn():
    w, _ = _setup()
    fmt = IntGroup(bits=4, group_size=32)
    cw = rtn_imatrix_quantize(w, torch.ones(128), fmt, n_grid=1)
    # with only the min-max candidate, only the least-squares scale refit can change the result, never for the worse
    assert _werr(w, cw.decode(), torch.ones(128)) <= _werr(w, quantize_rtn(w, fmt).decode(), torch.ones(128)) * (1 + 1e-6)


def test_method_uses_norms_and_errors():
    w, imp = _setup()
    m = build_method("rtn-imatrix", IntGroup(bits=4, group_size=32))
    assert isinstance(m, RTNImatrix)
    cw = m.apply(w, LayerStats(n_tokens=10, norms=imp), layer="L")
    assert torch.equal(cw.codes, rtn_imatrix_quantize(w, imp, m.format).codes)
    with pytest.raises(CalibrationError, match="'L'"):
        m.apply(w, LayerStats(), layer="L")
    imp2 = imp.clone()
    imp2[0] = float("inf")
    with pytest.raises(CalibrationError, match="'L'"):
        m.apply(w, LayerStats(n_tokens=10, norms=imp2), layer="L")
    with pytest.raises(ConfigError):
        RTNImatrix(format=IntGroup(bits=4), min_shrink=0)
