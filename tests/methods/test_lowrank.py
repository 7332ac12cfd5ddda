"""The weighted low-rank routine and the svd / svd-whitened / fwsvd methods, against float64 references."""

import pytest
import torch

from tensorslim.errors import CalibrationError, ConfigError, NumericalError, UnsupportedLayerError
from tensorslim.formats import LowRank, parse_format
from tensorslim.methods import build_method
from tensorslim.methods.lowrank import weighted_error, weighted_lowrank, whitening
from tensorslim.methods.svd import FWSVD, SVD, WhitenedSVD
from tensorslim.stats import LayerStats


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


def _layer(g, out=48, inp=32, tokens=400, aniso=True):
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    if aniso:  # heavy-tailed channel scales, as in real activations
        x = x * torch.logspace(-1, 1, inp, dtype=torch.float64)[torch.randperm(inp, generator=g)]
    return w, x


def _stats(x):
    return LayerStats(n_tokens=x.shape[0], gram=(x.T @ x).float())


def test_plain_is_truncated_svd_and_eckart_young():
    g = _seed()
    w, _ = _layer(g)
    for r in (1, 5, 32):
        u, v = weighted_lowrank(w, r)
        s = torch.linalg.svdvals(w)
        err = weighted_error(w, u.double() @ v.double())
        assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4, abs=1e-4)


def test_whitened_beats_plain_in_activation_norm_and_is_optimal():
    g = _seed()
    w, x = _layer(g)
    h = x.T @ x
    wh = whitening(h)
    for r in (2, 8, 16):
        uw, vw = weighted_lowrank(w, r, whiten=wh)
        up, vp = weighted_lowrank(w, r)
        ew = weighted_error(w, uw.double() @ vw.double(), h)
        ep = weighted_error(w, up.double() @ vp.double(), h)
        assert ew <= ep * (1 + 1e-6)
        # optimum: the tail singular values of W S (S S^T = H)
        chol = torch.linalg.cholesky(h)
        tail = torch.linalg.svdvals(w @ chol)[r:]
        assert ew == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-4)


def test_whitened_equals_plain_for_isotropic_inputs():
    g = _seed()
    w, _ = _layer(g)
    c = float(torch.rand((), generator=g)) * 10 + 0.1
    wh = whitening(c * torch.eye(w.shape[1], dtype=torch.float64))
    for r in (3, 10):
        uw, vw = weighted_lowrank(w, r, whiten=wh)
        up, vp = weighted_lowrank(w, r)
        a, b = uw.double() @ vw.double(), up.double() @ vp.double()
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_rank_deficient_gram_falls_back_and_stays_finite():
    g = _seed()
    w, x = _layer(g, tokens=10)  # 10 tokens, 32 inputs: rank-10 X^T X
    x[:, 3] = 0  # a dead channel
    h = x.T @ x
    for damp in (0.0, 0.01):
        u, v = weighted_lowrank(w, 8, whiten=whitening(h, damp=damp))
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        # still better than plain SVD on the data the statistic saw
        up, vp = weighted_lowrank(w, 8)
        assert weighted_error(w, u.double() @ v.double(), h) <= weighted_error(w, up.double() @ vp.double(), h) * 1.001


def _bf16_gram(x, chunk=64):
    """X^T X as the runner's bf16 calibration makes it: bf16 inputs, each chunk's product rounded to bf16."""
    xb = x.to(torch.bfloat16)
    return sum((c.T @ c).float() for c in xb.split(chunk)).double()


def test_indefinite_low_precision_gram_is_projected_not_rejected():
    from tensorslim.methods.lowrank import SMALL_RIDGE, psd_floor

    g = _seed()
    w, x = _layer(g, out=40, inp=48, tokens=600)
    x[:, 5] *= 300.0  # one massive channel (as in real LLM activations): bf16 rounding noise scales with it
    h = x.T @ x
    # an indefinite H beyond the small ridges: the rounding noise of a bf16 Gram, or (always) an explicit one
    hb = _bf16_gram(x)
    noisy = hb if float(torch.linalg.eigvalsh(hb)[0]) < -2 * SMALL_RIDGE * float(hb.diagonal().mean()) else None
    e = torch.randn(48, 48, generator=g, dtype=torch.float64)
    forced = h - (3 * SMALL_RIDGE * float(h.diagonal().mean())) * (e @ e.T) / float(torch.linalg.eigvalsh(e @ e.T)[-1]) \
        - 3 * SMALL_RIDGE * float(h.diagonal().mean()) * torch.eye(48, dtype=torch.float64)
    for hn in filter(lambda t: t is not None, (noisy, forced)):
        lam = torch.linalg.eigvalsh(hn)
        assert float(lam[0]) < -SMALL_RIDGE * float(hn.diagonal().mean())  # no small ridge can fix it
        p = psd_floor(hn)
        d = torch.linalg.eigvalsh(p - hn)
        assert float(d[0]) >= -1e-9 * float(lam[-1]) and float(d[-1]) <= 2 * -float(lam[0]) * (1 + 1e-9)
        assert float(torch.linalg.eigvalsh(p)[0]) > 0
        wh = whitening(hn)  # used to raise CalibrationError
        assert torch.allclose(wh.l @ wh.l.T, p, rtol=0, atol=1e-8 * float(lam[-1]))
        k = 12
        u, v = weighted_lowrank(w, k, whiten=wh)
        ue, ve = weighted_lowrank(w, k, whiten=whitening(h))
        err = weighted_error(w, u.double() @ v.double(), h)
        best = weighted_error(w, ue.double() @ ve.double(), h)
        up, vp = weighted_lowrank(w, k)
        plain = weighted_error(w, up.double() @ vp.double(), h)
        assert best <= err * (1 + 1e-9) and err < plain  # optimal on the true H is best; still far better than plain
    # a PD H is not touched by the projection (beyond the relative floor)
    assert torch.allclose(psd_floor(h), h, rtol=0, atol=1e-9 * float(torch.linalg.eigvalsh(h)[-1]))


def test_bad_inputs_raise_typed_errors():
    g = _seed()
    w, x = _layer(g)
    h = x.T @ x
    with pytest.raises(UnsupportedLayerError):
        weighted_lowrank(w, 33)
    with pytest.raises(UnsupportedLayerError):
        weighted_lowrank(w, 0)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        weighted_lowrank(bad, 4)
    hb = h.clone()
    hb[1, 2] = float("inf")
    with pytest.raises(CalibrationError):
        whitening(hb)
    with pytest.raises(CalibrationError):
        whitening(torch.zeros(32, 32))
    m = SVD(format=LowRank(rank=4))
    with pytest.raises(UnsupportedLayerError):
        m.apply(bad.float(), LayerStats())
    with pytest.raises(UnsupportedLayerError, match="rank 64"):
        SVD(format=LowRank(rank=64)).apply(w.float(), LayerStats(), layer="l0")
    with pytest.raises(CalibrationError):
        WhitenedSVD(format=LowRank(rank=4)).apply(w.float(), LayerStats())
    with pytest.raises(ConfigError):
        build_method("svd", parse_format("int4:g32"))


def test_methods_produce_lowrank_weights_and_resolve_reduction():
    g = _seed()
    w, x = _layer(g)
    st = _stats(x)
    for name in ("svd", "svd-whitened"):
        cw = build_method(name, parse_format("lowrank:r6:float32")).apply(w.float(), st, layer="l")
        assert cw.format == LowRank(rank=6, dtype="float32") and cw.nbytes == 6 * 80 * 4
        cw = build_method(name, parse_format("lowrank:0.5")).apply(w.float(), st, layer="l")
        assert cw.format.rank == int(0.5 * 48 * 32 / 80)
    # the whitened method minimizes the activation-weighted error
    h = x.T @ x
    ew = weighted_error(w, build_method("svd-whitened", LowRank(rank=6, dtype="float32")).apply(w.float(), st).decode(), h)
    ep = weighted_error(w, build_method("svd", LowRank(rank=6, dtype="float32")).apply(w.float(), st).decode(), h)
    assert ew <= ep * (1 + 1e-4)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_fwsvd_uniform_fisher_equals_svd_and_weighted_optimality(axis):
    g = _seed()
    w, _ = _layer(g)
    n = w.shape[1] if axis == "in" else w.shape[0]
    svd = SVD(format=LowRank(rank=5, dtype="float32")).apply(w.float(), LayerStats()).decode()
    uni = FWSVD(format=LowRank(rank=5, dtype="float32"), axis=axis).with_fisher(torch.full((n,), 3.0))
    # float32 SVD inside: equal up to float32 round-off, relative to the matrix
    assert float((uni.apply(w.float(), LayerStats()).decode() - svd).norm() / svd.norm()) < 1e-5
    # non-uniform Fisher: the weighted error is below the plain SVD's
    f = torch.rand(n, generator=g, dtype=torch.float64) ** 4
    m = FWSVD(format=LowRank(rank=5, dtype="float32"), axis=axis).with_fisher(f)
    approx = m.apply(w.float(), LayerStats()).decode().double()
    dw = (w - approx) if axis == "out" else (w - approx).T
    dp = (w - svd.double()) if axis == "out" else (w - svd.double()).T
    e_f = float((f.sqrt()[:, None] * dw).norm())
    e_p = float((f.sqrt()[:, None] * dp).norm())
    assert e_f <= e_p * (1 + 1e-5)
    # full [out, in] Fisher from LayerStats reduces to the same vector
    full = torch.rand(w.shape, generator=g)
    a = FWSVD(format=LowRank(rank=5), axis=axis).apply(w.float(), LayerStats(fisher=full)).decode()
    b = FWSVD(format=LowRank(rank=5), axis=axis).with_fisher(full).apply(w.float(), LayerStats()).decode()
    assert torch.allclose(a, b)
    with pytest.raises(CalibrationError):
        FWSVD(format=LowRank(rank=5)).apply(w.float(), LayerStats())
    assert "fisher_weights" not in m.to_dict()


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_gram_eigh_factors_equal_float64_svd_truncation(shape):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    w = torch.randn(*shape, generator=g) * torch.logspace(0, -3, shape[1])  # decaying columns: a real spectrum
    x = torch.randn(200, shape[1], generator=g) * torch.rand(shape[1], generator=g)
    wh = whitening(x.T @ x / 200)
    for r in (1, min(shape) // 2, min(shape)):
        u, v = weighted_lowrank(w, r, whiten=wh)  # default: eigh of the smaller float64 Gram
        u64, v64 = weighted_lowrank(w, r, whiten=wh, svd_dtype=torch.float64)
        a, b = u.double() @ v.double(), u64.double() @ v64.double()
        assert float((a - b).norm() / b.norm()) < 1e-5
        assert torch.allclose(u.norm(dim=0), u64.norm(dim=0), rtol=1e-4)  # same balanced split, U_r S_r^1/2
