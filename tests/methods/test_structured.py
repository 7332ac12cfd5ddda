import pytest
import torch

from tensorslim.errors import ConfigError, UnsupportedLayerError
from tensorslim.formats import Kronecker, Monarch, MonarchWeight, parse_format
from tensorslim.methods import build_method
from tensorslim.methods.structured import kronecker_project, monarch_project
from tensorslim.stats import LayerStats


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


@pytest.mark.parametrize("shape,m1,n1,terms", [((24, 36), 4, 6, 2), ((64, 48), 8, 6, 3), ((30, 20), 5, 4, 1)])
def test_kpsvd_recovers_kronecker_sums(shape, m1, n1, terms):
    g = _seed()
    m2, n2 = shape[0] // m1, shape[1] // n1
    w = sum(torch.kron(torch.randn(m1, n1, generator=g, dtype=torch.float64),
                       torch.randn(m2, n2, generator=g, dtype=torch.float64)) for _ in range(terms))
    cw = build_method("kpsvd", Kronecker(terms=terms, m1=m1, n1=n1, dtype="float32")).apply(w.float(), LayerStats())
    rel = float((cw.decode().double() - w).norm() / w.norm())
    assert rel < 1e-5


def test_kpsvd_error_formula_and_auto_shapes():
    g = _seed()
    w = torch.randn(36, 48, generator=g, dtype=torch.float64)
    fmt = parse_format("kron:t3:float32")
    m1, n1, m2, n2 = fmt.factor_shapes((36, 48))
    b, c = kronecker_project(w, 3, m1, n1)
    approx = sum(torch.kron(b[t].double(), c[t].double()) for t in range(3))
    r = w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    tail = torch.linalg.svdvals(r)[3:]
    assert float((w - approx).norm()) == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-4)


@pytest.mark.parametrize("shape,b,r", [((16, 16), 4, 1), ((48, 32), 4, 2), ((24, 36), 6, 1), ((12, 18), 3, 3)])
def test_monarch_recovers_monarch_matrices(shape, b, r):
    g = _seed()
    s, p = shape[0] // b, shape[1] // b
    lb, rb = torch.randn(b, s, b * r, generator=g), torch.randn(b, b * r, p, generator=g)
    w = MonarchWeight.from_factors(Monarch(blocks=b, rank=r, dtype="float32"), shape, lb, rb).decode().double()
    cw = build_method("monarch", Monarch(blocks=b, rank=r, dtype="float32")).apply(w.float(), LayerStats())
    rel = float((cw.decode().double() - w).norm() / w.norm())
    assert rel < 1e-5


def test_monarch_projection_is_per_slice_optimal():
    g = _seed()
    w = torch.randn(32, 32, generator=g, dtype=torch.float64)
    lb, rb = monarch_project(w, 4, 2)
    approx = MonarchWeight.from_factors(Monarch(blocks=4, rank=2, dtype="float32"), (32, 32), lb, rb).decode().double()
    slices = w.reshape(4, 8, 4, 8).permute(0, 2, 1, 3)
    tail = torch.linalg.svdvals(slices)[..., 2:]
    assert float((w - approx).norm()) == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-4)


def test_structured_bad_inputs():
    w = torch.randn(30, 20)
    with pytest.raises(UnsupportedLayerError):
        build_method("monarch", Monarch(blocks=4)).apply(w, LayerStats())
    with pytest.raises(UnsupportedLayerError):
        build_method("kpsvd", Kronecker(terms=2, m1=7, n1=4)).apply(w, LayerStats())
    bad = w.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(UnsupportedLayerError):
        build_method("kpsvd", Kronecker(terms=1)).apply(bad, LayerStats())
    with pytest.raises(ConfigError):
        build_method("monarch", parse_format("lowrank:r4"))
