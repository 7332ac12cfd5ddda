import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.formats import LowRank, parse_format
from tensorslim.methods import build_method
from tensorslim.methods.welore import WeLore, WeLoreWhitened, allocate_ranks, singular_values, stored_params
from tensorslim.stats import LayerStats, Stat


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


def _weights(g):
    """Matrices with very different spectra: near-low-rank ones and flat (Gaussian) ones."""
    out = {}
    for i, (o, n) in enumerate([(48, 32), (32, 32), (64, 32), (32, 48)]):
        k = 4 + 3 * i
        low = torch.randn(o, k, generator=g) @ torch.randn(k, n, generator=g)
        noise = 0.02 * torch.randn(o, n, generator=g)
        out[f"lr{i}"] = low + noise
        out[f"flat{i}"] = torch.randn(o, n, generator=g)
    return out


def _reduction(weights, ranks):
    total = sum(w.numel() for w in weights.values())
    return 1 - sum(stored_params(tuple(weights[n].shape), k) for n, k in ranks.items()) / total


def _rel_err_sum(weights, ranks):
    tot = 0.0
    for n, w in weights.items():
        k = ranks[n]
        if k is None:
            continue
        s = torch.linalg.svdvals(w.double())
        tot += float(s[k:].square().sum() / s.square().sum())
    return tot


@pytest.mark.parametrize("rule", ["welore", "energy", "uniform"])
@pytest.mark.parametrize("target", [0.2, 0.4])
def test_allocation_hits_target_within_a_rank_step(rule, target):
    g = _seed()
    ws = _weights(g)
    ranks = allocate_ranks(ws, target, rule)
    assert set(ranks) == set(ws)
    red = _reduction(ws, ranks)
    assert red >= target - (1e-9 if rule != "uniform" else 0.02)
    assert red <= target + 0.08
    for n, k in ranks.items():
        if k is not None:
            o, i = ws[n].shape
            assert 1 <= k and k * (o + i) < o * i
    assert allocate_ranks(ws, target, rule) == ranks  # deterministic


def test_welore_prefers_low_rank_matrices_and_beats_uniform():
    g = _seed()
    ws = _weights(g)
    ranks = allocate_ranks(ws, 0.4, "welore")
    uni = allocate_ranks(ws, 0.4, "uniform")
    # the near-low-rank matrices are the ones cut
    assert all(ranks[f"lr{i}"] is not None for i in range(4))
    assert _rel_err_sum(ws, ranks) < _rel_err_sum(ws, uni)
    # spectra can be given (cached) and give the same answer
    assert allocate_ranks(ws, 0.4, "welore", spectra=singular_values(ws)) == ranks


def test_bad_targets():
    ws = {"a": torch.randn(16, 16)}
    with pytest.raises(ConfigError):
        allocate_ranks(ws, 1.5)
    with pytest.raises(ConfigError):
        allocate_ranks(ws, 0.3, "nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot remove"):
        allocate_ranks(ws, 0.99, "welore")


def test_method_resolve_and_apply():
    g = _seed()
    ws = _weights(g)
    m = build_method("welore", parse_format("lowrank:0.3"))
    with pytest.raises(ConfigError, match="resolve"):
        m.apply(ws["lr0"], LayerStats())
    table = m.resolve(ws)
    ranks = allocate_ranks(ws, 0.3)
    for n, meth in table.items():
        if ranks[n] is None:
            assert meth is None
        else:
            assert isinstance(meth, WeLore) and meth.format == LowRank(rank=ranks[n])
            cw = meth.apply(ws[n], LayerStats(), layer=n)
            assert cw.format.rank == ranks[n]
    assert WeLoreWhitened.requires == frozenset({Stat.GRAM}) and WeLore.requires == frozenset()
    mw = build_method("welore-whitened", parse_format("lowrank:0.3"), rule="energy").resolve(ws)
    x = torch.randn(100, 32, generator=g)
    some = next(n for n, v in mw.items() if v is not None and ws[n].shape[1] == 32)
    cw = mw[some].apply(ws[some], LayerStats(n_tokens=100, gram=x.T @ x), layer=some)
    assert cw.format.rank == allocate_ranks(ws, 0.3, "energy")[some]
