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
    mw = build_method("welore-whitened", parse_format("lowrank:0.3"), rule="energy", spectra="weight").resolve(ws)
    x = torch.randn(100, 32, generator=g)
    some = next(n for n, v in mw.items() if v is not None and ws[n].shape[1] == 32)
    cw = mw[some].apply(ws[some], LayerStats(n_tokens=100, gram=x.T @ x), layer=some)
    assert cw.format.rank == allocate_ranks(ws, 0.3, "energy")[some]


def _norm_tail(spectra, ranks):
    tot = 0.0
    for n, k in ranks.items():
        if k is not None:
            e = spectra[n].double().square()
            tot += float(e[k:].sum() / e.sum())
    return tot


def test_error_rule_is_near_the_brute_force_optimum_and_beats_the_others():
    import itertools

    g = _seed()
    shapes = [(12, 8), (8, 8), (16, 8)]
    ws, spectra = {}, {}
    for j, (o, i) in enumerate(shapes):
        decay = 0.2 + 1.5 * torch.rand((), generator=g)  # very different spectra per matrix
        s = torch.exp(-decay * torch.arange(min(o, i), dtype=torch.float64)) * (1 + 10 * torch.rand((), generator=g))
        u, _ = torch.linalg.qr(torch.randn(o, o, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(i, i, generator=g, dtype=torch.float64))
        ws[f"m{j}"] = (u[:, :len(s)] * s) @ v[:, :len(s)].T
        spectra[f"m{j}"] = s
    target = 0.3
    got = allocate_ranks(ws, target, "error", spectra=spectra)
    assert _reduction(ws, got) >= target - 1e-12
    for n, k in got.items():
        if k is not None:
            o, i = ws[n].shape
            assert k * (o + i) < o * i
    # brute force over every (rank below break-even or dense) choice meeting the budget
    options = []
    for n, w in ws.items():
        o, i = w.shape
        options.append([(n, k) for k in range(1, min(o, i) + 1) if k * (o + i) < o * i] + [(n, None)])
    best = min(_norm_tail(spectra, dict(c)) for c in itertools.product(*options) if _reduction(ws, dict(c)) >= target)
    mine = _norm_tail(spectra, got)
    assert mine <= best + max(float(s.square().max() / s.square().sum()) for s in spectra.values()) * 0.5 + 1e-12
    assert allocate_ranks(ws, target, "error", spectra=spectra) == got  # deterministic


@pytest.mark.parametrize("target", [0.2, 0.4])
def test_error_rule_beats_uniform_and_welore_on_its_objective(target):
    ws = _weights(_seed())
    sv = singular_values(ws)
    mine = allocate_ranks(ws, target, "error", spectra=sv)
    assert _reduction(ws, mine) >= target
    # at 20% on these small matrices one rank is ~0.5% of the parameters, and the error rule can land up to one rank
    # past the target (WeLore's bisection then sometimes lands closer): 5% of slack there, none at 40%
    slack = 1.05 if target < 0.3 else 1.0
    for rule in ("uniform", "welore"):
        other = allocate_ranks(ws, target, rule, spectra=sv)
        assert _reduction(ws, other) >= target - 0.02
        assert _norm_tail(sv, mine) <= slack * _norm_tail(sv, other) + 1e-12


def test_global_whitened_method_needs_grams_and_uses_whitened_spectra():
    from tensorslim.methods.welore import GlobalWhitenedSVD, whitened_spectra

    g = _seed()
    ws = _weights(g)
    m = build_method("svd-whitened-global", parse_format("lowrank:0.3"))
    with pytest.raises(ConfigError, match="X\\^T X"):
        m.resolve(ws)
    grams = {}
    for n, w in ws.items():
        x = torch.randn(400, w.shape[1], generator=g, dtype=torch.float64)
        if n == "flat0":  # inputs confined to 3 directions: a flat matrix is then rank 3 where it matters
            x = torch.randn(400, 3, generator=g, dtype=torch.float64) @ torch.randn(3, w.shape[1], generator=g,
                                                                                    dtype=torch.float64) + 1e-4 * x
        grams[n] = (x.T @ x / 400).float()
    table = m.resolve(ws, grams=grams)
    want = allocate_ranks(ws, 0.3, "error", spectra=whitened_spectra(ws, grams))
    assert {n: (None if v is None else v.format.rank) for n, v in table.items()} == want
    assert want["flat0"] is not None and want["flat0"] <= 4  # data-aware: cut to the 3 directions the data uses
    assert allocate_ranks(ws, 0.3, "error")["flat0"] is None  # data-free: a flat spectrum stays dense
    some = next(n for n, v in table.items() if v is not None)
    assert isinstance(table[some], GlobalWhitenedSVD)
    cw = table[some].apply(ws[some], LayerStats(n_tokens=1, gram=grams[some].double()), layer=some)
    assert cw.format.rank == want[some]


def _grams_with_a_confined_input(ws, g):
    """Isotropic inputs everywhere except ``flat0``, whose inputs live in 3 directions (+ a little noise)."""
    grams = {}
    for n, w in ws.items():
        x = torch.randn(400, w.shape[1], generator=g, dtype=torch.float64)
        if n == "flat0":
            x = torch.randn(400, 3, generator=g, dtype=torch.float64) @ torch.randn(3, w.shape[1], generator=g,
                                                                                    dtype=torch.float64) + 1e-4 * x
        grams[n] = (x.T @ x / 400).float()
    return grams


def test_welore_whitened_allocates_on_the_whitened_spectra():
    from tensorslim.methods.welore import whitened_spectra

    g = _seed()
    ws = _weights(g)
    grams = _grams_with_a_confined_input(ws, g)
    assert build_method("welore-whitened", parse_format("lowrank:0.3")).spectra == "weight"  # the paper's default
    m = build_method("welore-whitened", parse_format("lowrank:0.3"), spectra="whitened")
    assert m.resolve_needs_grams
    with pytest.raises(ConfigError, match="X\\^T X"):
        m.resolve(ws)
    table = m.resolve(ws, grams=grams)
    want = allocate_ranks(ws, 0.3, "welore", spectra=whitened_spectra(ws, grams))
    assert {n: (None if v is None else v.format.rank) for n, v in table.items()} == want
    # whitened spectra: flat0 is rank 3 where the data lives, so WeLore cuts it to ~3; its weight spectrum is flat, so
    # on W's spectra it stays dense or keeps most of its rank (min-max normalization may prune a few of 32)
    assert want["flat0"] is not None and want["flat0"] <= 4
    weight_rule = build_method("welore-whitened", parse_format("lowrank:0.3"), spectra="weight")
    assert not weight_rule.resolve_needs_grams
    flat_w = weight_rule.resolve(ws)["flat0"]
    assert flat_w is None or flat_w.format.rank > 8
    # the whitened spectrum of W is the one whose tail is the activation-weighted error: check on one matrix
    n = "lr1"
    x = torch.linalg.cholesky(grams[n].double())
    s = torch.linalg.svdvals(ws[n].double() @ x)
    assert torch.allclose(whitened_spectra({n: ws[n]}, {n: grams[n]})[n].double(), s, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="spectra"):
        build_method("welore-whitened", parse_format("lowrank:0.3"), spectra="grad")
