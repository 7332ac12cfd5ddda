import pytest
import torch

from tensorslim.errors import CalibrationError, UnsupportedLayerError
from tensorslim.formats import IntGroup, IntGroupWeight, quantize_rtn
from tensorslim.methods import build_method
from tensorslim.methods.gptq import GPTQ, gptq_quantize
from tensorslim.methods.obs import layer_objective
from tensorslim.stats import LayerStats


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def _hessian(n: int, gen: torch.Generator, tokens: int = 1024) -> torch.Tensor:
    mix = torch.eye(n) + 0.2 * torch.randn(n, n, generator=gen)
    x = torch.randn(tokens, n, generator=gen) @ mix * torch.rand(n, generator=gen).mul(3).exp()
    return x.T @ x / tokens


FORMATS = [
    IntGroup(bits=4, group_size=32),
    IntGroup(bits=3, group_size=32, symmetric=True),
    IntGroup(bits=2, group_size=None),
    IntGroup(bits=3, group_size=32, act_order=True),
    IntGroup(bits=8, group_size=64),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.spec())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_objective_not_above_rtn(fmt, act_order):
    gen = torch.Generator().manual_seed(_seed())
    w = torch.randn(24, 128, generator=gen)
    h = _hessian(128, gen)
    cw = gptq_quantize(w, h, fmt, act_order=act_order, block_size=64)
    perm = cw.perm.long() if fmt.act_order else None
    rtn = quantize_rtn(w, fmt, perm)
    assert layer_objective(w, cw.decode(), h) <= layer_objective(w, rtn.decode(), h)
    if fmt.bits <= 4:  # on correlated inputs GPTQ is clearly better, not merely equal through the fallback
        assert layer_objective(w, cw.decode(), h) < 0.9 * layer_objective(w, rtn.decode(), h)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if not f.act_order], ids=lambda f: f.spec())
def test_identity_hessian_gives_exactly_rtn(fmt):
    gen = torch.Generator().manual_seed(_seed())
    w = torch.randn(9, 128, generator=gen) * 0.02
    cw = gptq_quantize(w, torch.eye(128), fmt)
    rtn = quantize_rtn(w, fmt)
    assert torch.equal(cw.codes, rtn.codes) and torch.equal(cw.scales, rtn.scales)
    assert (cw.zeros is None and rtn.zeros is None) or torch.equal(cw.zeros, rtn.zeros)


def test_act_order_format_stores_perm_and_roundtrips():
    gen = torch.Generator().manual_seed(_seed())
    w = torch.randn(8, 64, generator=gen)
    h = _hessian(64, gen)
    fmt = IntGroup(bits=4, group_size=16, act_order=True)
    cw = gptq_quantize(w, h, fmt)
    assert torch.equal(cw.perm.long(), torch.argsort(h.diagonal(), descending=True, stable=True))
    back = IntGroupWeight.from_tensors(fmt, cw.shape, cw.tensors())
    assert torch.equal(back.decode(), cw.decode())
    assert cw.nbytes == fmt.nbytes((8, 64))


def test_static_groups_equal_rtn_grid():
    gen = torch.Generator().manual_seed(_seed())
    w = torch.randn(8, 64, generator=gen)
    h = _hessian(64, gen)
    fmt = IntGroup(bits=3, group_size=16)
    cw = gptq_quantize(w, h, fmt, act_order=True)  # static groups: grids are those of RTN, only codes change
    rtn = quantize_rtn(w, fmt)
    assert torch.equal(cw.scales, rtn.scales) and torch.equal(cw.zeros, rtn.zeros)
    assert cw.perm is None


def test_dead_columns_and_zero_rows():
    gen = torch.Generator().manual_seed(_seed())
    w = torch.randn(6, 64, generator=gen)
    w[2] = 0  # an all-zero row
    h = _hessian(64, gen)
    h[5, :] = 0
    h[:, 5] = 0
    cw = gptq_quantize(w, h, IntGroup(bits=4, group_size=32))
    d = cw.decode()
    assert torch.isfinite(d).all()
    assert torch.all(d[2] == 0)
    assert layer_objective(w, d, h) <= layer_objective(w, quantize_rtn(w, IntGroup(bits=4, group_size=32)).decode(), h)


def test_method_api_and_bad_input():
    gen = torch.Generator().manual_seed(_seed())
    w = torch.randn(8, 64, generator=gen)
    x = torch.randn(200, 64, generator=gen)
    stats = LayerStats(n_tokens=200, gram=x.T @ x)
    m = build_method("gptq", IntGroup(bits=4, group_size=32), damp=0.02)
    assert isinstance(m, GPTQ) and m.damp == 0.02
    cw = m.apply(w, stats, layer="blk.0.q")
    assert cw.format == IntGroup(bits=4, group_size=32)
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(UnsupportedLayerError, match="blk.0.q"):
        m.apply(bad, stats, layer="blk.0.q")
    with pytest.raises(UnsupportedLayerError, match="blk.0.q"):
        build_method("gptq", IntGroup(bits=4, group_size=48)).apply(w, stats, layer="blk.0.q")
    with pytest.raises(CalibrationError, match="blk.0.q"):
        m.apply(w, LayerStats(), layer="blk.0.q")
    g = stats.gram.clone()
    g[1, 2] = float("nan")
    with pytest.raises(CalibrationError, match="blk.0.q"):
        m.apply(w, LayerStats(n_tokens=200, gram=g), layer="blk.0.q")


def test_imatrix_grid_option():
    from tensorslim.methods.rtn_imatrix import weighted_grid

    gen = torch.Generator().manual_seed(_seed())
    w = torch.randn(16, 128, generator=gen)
    w[torch.rand(16, 128, generator=gen) < 0.03] *= 8
    h = _hessian(128, gen)
    fmt = IntGroup(bits=3, group_size=32)
    cw = gptq_quantize(w, h, fmt, act_order=True, grid="imatrix")
    imp = h.diagonal() + 1e-6 * float(h.diagonal().mean()) + 1e-30
    s, z = weighted_grid(w.reshape(16, 4, 32), imp.reshape(4, 32), fmt)
    rtn = quantize_rtn(w, fmt)
    if layer_objective(w, cw.decode(), h) < layer_objective(w, rtn.decode(), h):  # not the RTN fallback
        assert torch.equal(cw.scales.float(), s) and torch.equal(cw.zeros, IntGroupWeight.from_codes(
            fmt, torch.zeros(16, 128, dtype=torch.long), s, z).zeros)
    assert layer_objective(w, cw.decode(), h) <= layer_objective(w, rtn.decode(), h)
    with pytest.raises(Exception):
        gptq_quantize(w, h, fmt, grid="nope")
