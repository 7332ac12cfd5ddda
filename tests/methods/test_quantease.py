import pytest
import torch

from tensorslim.errors import ConfigError, UnsupportedLayerError
from tensorslim.formats import IntGroup, quantize_rtn
from tensorslim.methods import build_method
from tensorslim.methods.gptq import gptq_quantize
from tensorslim.methods.obs import layer_objective
from tensorslim.methods.quantease import Grid, QuantEase, cd_passes, quantease_quantize
from tensorslim.stats import LayerStats


def _setup(out=16, inp=96, tokens=600):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = torch.randn(out, inp, generator=gen)
    x = torch.randn(tokens, inp, generator=gen) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=gen))
    return w, x.T @ x / tokens


@pytest.mark.parametrize("fmt", [IntGroup(bits=3, group_size=32), IntGroup(bits=2, group_size=None, symmetric=True),
                                 IntGroup(bits=4, group_size=16, act_order=True)], ids=lambda f: f.spec())
def test_objective_never_increases_float64(fmt):
    w, h = _setup()
    start = quantize_rtn(w, fmt, torch.randperm(96) if fmt.act_order else None)
    grid, codes = Grid.of(start)
    _, trace = cd_passes(w.double(), h.double(), grid, codes, iters=8, dtype=torch.float64, block_size=20,
                         order=torch.randperm(96))
    assert len(trace) == 9
    assert all(b <= a * (1 + 1e-12) for a, b in zip(trace, trace[1:]))
    assert trace[-1] < trace[0]


def test_trace_matches_decoded_objective_and_beats_gptq():
    w, h = _setup()
    fmt = IntGroup(bits=3, group_size=32)
    cw, trace = quantease_quantize(w, h, fmt, iters=10, tol=0)
    f = layer_objective(w, cw.decode(), h)
    assert abs(trace[-1] - f) <= 1e-4 * f
    g = gptq_quantize(w, h, fmt, act_order=True)
    assert abs(trace[0] - layer_objective(w, g.decode(), h)) <= 1e-4 * f  # warm start is GPTQ
    assert f <= layer_objective(w, g.decode(), h)
    assert f <= layer_objective(w, quantize_rtn(w, fmt).decode(), h)
    # the grid is the warm start's: scales unchanged
    assert torch.equal(cw.scales, g.scales)


def test_rtn_init_and_dead_columns():
    w, h = _setup()
    h[7, :] = 0
    h[:, 7] = 0
    fmt = IntGroup(bits=4, group_size=32)
    cw, trace = quantease_quantize(w, h, fmt, iters=5, init="rtn", tol=0)
    rtn = quantize_rtn(w, fmt)
    assert trace[0] == pytest.approx(layer_objective(w, rtn.decode(), h), rel=1e-4)
    assert torch.equal(cw.decode()[:, 7], rtn.decode()[:, 7])  # dead input keeps its start value
    assert torch.isfinite(cw.decode()).all()


def test_method_api():
    w, h = _setup()
    m = build_method("quantease", IntGroup(bits=3, group_size=32), iters=3)
    assert isinstance(m, QuantEase) and m.iters == 3
    cw = m.apply(w, LayerStats(n_tokens=1, gram=h), layer="L")
    assert cw.nbytes == IntGroup(bits=3, group_size=32).nbytes(tuple(w.shape))
    bad = w.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(UnsupportedLayerError, match="'L'"):
        m.apply(bad, LayerStats(n_tokens=1, gram=h), layer="L")
    with pytest.raises(ConfigError):
        QuantEase(format=IntGroup(bits=3), init="magic")


# -- the outlier-aware variant -------------------------------------------------------------------------------------
from tensorslim.formats import Sum, parse_format  # noqa: E402
from tensorslim.formats.outliers import SparseOutliers  # noqa: E402
from tensorslim.methods.quantease_outliers import QuantEaseOutliers, quantease_outliers_quantize  # noqa: E402


@pytest.mark.parametrize("grid", ["minmax", "imatrix"])
@pytest.mark.parametrize("heavy", [True, False])
def test_outliers_never_worse_than_plain_and_trace_monotone(heavy, grid):
    w, h = _setup(out=12, inp=128)
    if heavy:
        w[torch.rand(w.shape) < 0.02] *= 12
    fmt, ofmt = IntGroup(bits=3, group_size=32), SparseOutliers(fraction=0.02)
    # the comparison is with plain QuantEase on the same grid rule (the methods' default is "imatrix")
    plain, ptrace = quantease_quantize(w, h, fmt, iters=6, grid=grid)
    sw, trace = quantease_outliers_quantize(w, h, fmt, ofmt, iters=6, outlier_iters=4, grid=grid)
    f = layer_objective(w, sw.decode(), h)
    assert f <= layer_objective(w, plain.decode(), h) * (1 + 1e-5)
    assert f < layer_objective(w, plain.decode(), h)  # outliers do help
    assert abs(trace[-1] - f) <= 1e-3 * f
    assert all(b <= a * (1 + 1e-5) for a, b in zip(trace[1:], trace[2:]))
    nnz = (sw.extra.decode() != 0).sum(1)
    assert torch.all(nnz <= ofmt.per_row(128)) and sw.extra.indices.shape == (12, ofmt.per_row(128))
    assert sw.nbytes == Sum(base=fmt, extra=ofmt).nbytes((12, 128))


def test_outlier_method_formats():
    w, h = _setup(out=8, inp=64)
    stats = LayerStats(n_tokens=1, gram=h)
    m = build_method("quantease-outliers", IntGroup(bits=3, group_size=32), iters=2, outlier_iters=2)
    assert isinstance(m, QuantEaseOutliers)
    cw = m.apply(w, stats, layer="L")
    assert cw.format == parse_format("int3:g32+outliers:0.01")
    m2 = build_method("quantease-outliers", parse_format("int3:g32+outliers:0.05"), iters=2, outlier_iters=2)
    assert m2.apply(w, stats, layer="L").format.extra.fraction == 0.05
    with pytest.raises(ConfigError):
        build_method("quantease-outliers", parse_format("int3:g32+int4:g32"))
