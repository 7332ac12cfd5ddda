import pytest
import torch

from tensorslim.errors import ConfigError, UnsupportedLayerError
from tensorslim.formats import IntGroup, quantize_rtn
from tensorslim.methods import build_method
from tensorslim.methods.hqq import HQQ, hqq_quantize
from tensorslim.stats import LayerStats


def _w(out=32, inp=256):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = torch.randn(out, inp, generator=gen) * 0.02
    w[torch.rand(out, inp, generator=gen) < 0.01] *= 15  # heavy-tailed, like LLM weights
    return w


@pytest.mark.parametrize("fmt", [IntGroup(bits=4, group_size=64), IntGroup(bits=3, group_size=64),
                                 IntGroup(bits=2, group_size=None), IntGroup(bits=4, group_size=32, symmetric=True)],
                         ids=lambda f: f.spec())
def test_hqq_never_worse_than_minmax_in_mean_abs_error(fmt):
    w = _w()
    h = hqq_quantize(w, fmt)
    r = quantize_rtn(w, fmt)
    g = fmt.group(w.shape[1])
    eh = (w - h.decode()).abs().reshape(w.shape[0], -1, g).mean(-1)
    er = (w - r.decode()).abs().reshape(w.shape[0], -1, g).mean(-1)
    assert torch.all(eh <= er + 1e-9)  # per group
    assert eh.mean() < er.mean()  # and it does improve
    assert h.nbytes == fmt.nbytes(tuple(w.shape))


def test_zero_iterations_is_rtn_and_zero_row():
    w = _w()
    w[3] = 0
    fmt = IntGroup(bits=4, group_size=64)
    assert torch.equal(hqq_quantize(w, fmt, iters=0).codes, quantize_rtn(w, fmt).codes)
    d = hqq_quantize(w, fmt).decode()
    assert torch.all(d[3] == 0) and torch.isfinite(d).all()


def test_method_api():
    m = build_method("hqq", IntGroup(bits=4, group_size=64), iters=5)
    assert isinstance(m, HQQ) and m.iters == 5 and not m.requires
    w = _w()
    m.apply(w, LayerStats(), layer="x")
    w[0, 0] = float("nan")
    with pytest.raises(UnsupportedLayerError, match="'x'"):
        m.apply(w, LayerStats(), layer="x")
    with pytest.raises(ConfigError):
        HQQ(format=IntGroup(bits=4, act_order=True))
