import itertools

import pytest
import torch
from torch import nn

from tensorslim.errors import ConfigError, UnsupportedModelError
from tensorslim.models import get_adapter, tiny_model
from tensorslim.runtime import ActSparseLinear, apply_activation_sparsity, realized_sparsity, reset_counts
from tensorslim.runtime.act_alloc import allocate_block, error_curves, greedy_allocation


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def test_wina_topk_is_optimal_for_orthogonal_columns() -> None:
    """With column-orthogonal W, WINA's top-k is the brute-force best k-sparse mask; TEAL's is never better."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    w = q * (torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1)[None, :]  # orthogonal columns, varied norms
    lin = nn.Linear(d, d, bias=False).double()
    lin.weight.data = w
    x = torch.randn(d, generator=g, dtype=torch.float64)
    wina = ActSparseLinear(lin, 0.5, col_weight=w.norm(dim=0))
    teal = ActSparseLinear(lin, 0.5)
    y = w @ x

    def err(mask: torch.Tensor) -> float:
        return float((w @ (x * mask) - y).pow(2).sum())

    best = min(err(torch.tensor([i in keep for i in range(d)], dtype=torch.float64))
               for keep in itertools.combinations(range(d), d // 2))
    assert err(wina.mask(x).double()) == pytest.approx(best, rel=1e-9)
    assert err(teal.mask(x).double()) >= best - 1e-12


@pytest.mark.parametrize("s", [0.0, 0.25, 0.4, 0.5])
def test_topk_sparsity_is_exact(s: float) -> None:
    lin = nn.Linear(40, 7)
    m = ActSparseLinear(lin, s)
    x = torch.randn(3, 5, 40)
    mask = m.mask(x)
    assert bool((mask.sum(-1) == 40 - int(s * 40)).all())
    ref = lin(x * mask)
    assert torch.allclose(m(x), ref)


@pytest.mark.parametrize("transform", ["k-gate", "stacked"])
def test_wina_transform_at_zero_sparsity_is_invariant(transform: str) -> None:
    seed = _seed() % 10_000
    model = tiny_model("llama", seed=seed)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids).logits
        apply_activation_sparsity(model, get_adapter(model), None, 0.0, kind="wina", transform=transform)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-4
    attn = model.model.layers[0].self_attn
    if transform == "k-gate":  # the SVD basis makes k_proj column-orthogonal
        mats = [attn.k_proj.weight]
    else:  # ... or the stacked readers of the attention input
        mats = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    w = torch.cat([m.detach().double() for m in mats])
    gram = w.T @ w
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-4 * gram.diagonal().max().item())


def test_shared_mask_is_optimal_for_the_stacked_group() -> None:
    """After the stacked transform the group [Wq; Wk; Wv] is column-orthogonal: the shared WINA mask (stacked column
    norms) is the brute-force best k-sparse mask for the summed output error of the group."""
    seed = _seed() % 10_000
    g = torch.Generator().manual_seed(seed)
    d = 8
    mats = [torch.randn(r, d, generator=g, dtype=torch.float64) for r in (8, 4, 4)]
    _, _, vh = torch.linalg.svd(torch.cat(mats), full_matrices=True)
    rot = [m @ vh.T for m in mats]  # the group in the rotated basis
    x = torch.randn(d, generator=g, dtype=torch.float64)
    stacked = torch.cat(rot)
    norms = stacked.norm(dim=0)
    lin = nn.Linear(d, d, bias=False).double()
    mod = ActSparseLinear(lin, 0.5, col_weight=norms)

    def err(mask: torch.Tensor) -> float:
        return float(sum((w @ (x * mask) - w @ x).pow(2).sum() for w in rot))

    best = min(err(torch.tensor([i in keep for i in range(d)], dtype=torch.float64))
               for keep in itertools.combinations(range(d), d // 2))
    assert err(mod.mask(x).double()) == pytest.approx(best, rel=1e-9)


def test_topk_is_exact_with_ties() -> None:
    """Tied scores (zeros, repeated values) still drop exactly floor(s*in) per token, the smallest ones."""
    lin = nn.Linear(16, 3)
    m = ActSparseLinear(lin, 0.5)
    g = torch.Generator().manual_seed(_seed())
    x = torch.randn(5, 16, generator=g)
    x[0, :10] = 0.0  # ten zeros, eight to drop
    x[1] = torch.tensor([1.0, -1.0] * 8)  # all scores equal
    keep = m.mask(x)
    assert bool((keep.sum(-1) == 8).all())
    s = x.abs()
    for r in range(5):
        assert float(s[r][~keep[r]].max()) <= float(s[r][keep[r]].min())


def test_dense_prefix_and_realized_sparsity() -> None:
    lin = nn.Linear(40, 7)
    m = ActSparseLinear(lin, 0.5, dense_prefix=0.1)
    x = torch.randn(2, 20, 40)
    keep = m.mask(x)
    n_dense = 20 - int(0.9 * 20)
    assert bool(keep[:, :n_dense].all()) and bool((keep[:, n_dense:].sum(-1) == 20).all())
    model = nn.Sequential(m, nn.ReLU(), ActSparseLinear(nn.Linear(7, 3), 0.0))
    reset_counts(model)
    with torch.no_grad():
        model(x)
    dropped = 2 * (20 - n_dense) * 20  # 20 of 40 inputs per sparsified token
    assert realized_sparsity(model) == pytest.approx(dropped * 7 / (2 * 20 * 40 * 7 + 2 * 20 * 7 * 3))


def test_allocate_block_meets_the_target_and_prefers_cheap_linears() -> None:
    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    g = torch.Generator().manual_seed(_seed())
    scale = {"a": 0.0, "b": 1.0, "c": float(torch.rand((), generator=g)) * 10 + 0.5}
    curves = {n: [c * s * s for s in grid] for n, c in scale.items()}  # convex error curves; "a" is free
    sizes = {"a": 100, "b": 300, "c": 200}
    last = None
    for target in (0.1, 0.25, 0.4, 0.5, 0.7):
        alloc = allocate_block(curves, grid, sizes, target)
        mean = sum(alloc[n] * sizes[n] for n in sizes) / sum(sizes.values())
        assert mean == pytest.approx(target, abs=1e-12)
        assert all(0.0 <= v <= 0.9 for v in alloc.values())
        if last is not None:  # a higher target never lowers a linear's sparsity
            assert all(alloc[n] >= last[n] - 1e-12 for n in alloc)
        last = alloc
    assert allocate_block(curves, grid, sizes, 0.15)["a"] == pytest.approx(0.9)  # the free linear fills up first
    with pytest.raises(ConfigError):
        allocate_block(curves, grid, sizes, 0.95)


def test_greedy_allocation_on_a_model_meets_the_target_per_block() -> None:
    seed = _seed() % 10_000
    model = tiny_model("llama", seed=seed)
    cal = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(seed))
    adapter = get_adapter(model)
    apply_activation_sparsity(model, adapter, None, 0.0, kind="wina")
    curves = error_curves(model, adapter, cal, grid=[0.0, 0.25, 0.5, 0.75])
    assert len(curves) == 2 and all(c[n][0] == 0.0 for c in curves for n in c)
    assert all(max(c[n]) > 0 for c in curves for n in c)
    allocs = greedy_allocation(model, adapter, cal, [0.3, 0.5], grid=[0.0, 0.25, 0.5, 0.75], curves=curves)
    for target, alloc in allocs.items():
        for i in range(2):
            names = [n for n in alloc if n.startswith(f"model.layers.{i}.")]
            sizes = {n: model.get_submodule(n).weight.numel() for n in names}
            mean = sum(alloc[n] * sizes[n] for n in names) / sum(sizes.values())
            assert mean == pytest.approx(target, abs=1e-9)
    # applied: the counters see the allocated sparsities (topk floors each linear's count, so slightly below)
    fresh = tiny_model("llama", seed=seed)
    apply_activation_sparsity(fresh, None, None, 0.5, kind="wina", allocation=allocs[0.5])
    reset_counts(fresh)
    with torch.no_grad():
        fresh(cal)
    assert 0.45 < realized_sparsity(fresh) <= 0.5


def test_wina_beats_teal_when_column_norms_differ() -> None:
    """On a (non-orthogonal) linear whose columns have very different norms, WINA's masks lose less output energy."""
    g = torch.Generator().manual_seed(_seed())
    w = torch.randn(48, 64, generator=g) * torch.exp(torch.randn(64, generator=g))[None, :]
    lin = nn.Linear(64, 48, bias=False)
    lin.weight.data = w
    x = torch.randn(256, 64, generator=g)
    y = x @ w.T
    err = {}
    for kind, cw in (("wina", w.norm(dim=0)), ("teal", None)):
        mod = ActSparseLinear(lin, 0.5, col_weight=cw)
        with torch.no_grad():
            err[kind] = float((mod(x) - y).pow(2).sum())
    assert err["wina"] < err["teal"]


def test_threshold_mode_calibrates_to_target_on_average() -> None:
    model = tiny_model("llama", seed=1)
    cal = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    apply_activation_sparsity(model, None, cal, 0.4, kind="teal", mode="threshold")
    mod = model.model.layers[1].mlp.down_proj
    assert isinstance(mod, ActSparseLinear) and mod.mode == "threshold"
    seen = []
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(1 - m.mask(a[0]).float().mean().item()))
    with torch.no_grad():
        model(cal)
    h.remove()
    assert seen[0] == pytest.approx(0.4, abs=0.02)


def test_bad_inputs() -> None:
    model = tiny_model("llama")
    for bad in (1.0, -0.2):
        with pytest.raises(ConfigError):
            apply_activation_sparsity(model, None, None, bad)
    with pytest.raises(ConfigError):
        apply_activation_sparsity(model, None, None, 0.4, kind="relu")
    with pytest.raises(ConfigError):
        apply_activation_sparsity(model, None, None, 0.4, mode="threshold")
    with pytest.raises(ConfigError):
        apply_activation_sparsity(model, None, None, 0.4, allocation="greedy")  # needs calibration text
    with pytest.raises(ConfigError):
        apply_activation_sparsity(model, None, None, 0.4, transform="pca")
    with pytest.raises(ConfigError):
        apply_activation_sparsity(model, None, None, 0.4, allocation={"model.layers.9.mlp.up_proj": 0.4})
    gemma = tiny_model("gemma3")
    with pytest.raises(UnsupportedModelError):
        apply_activation_sparsity(gemma, None, None, 0.4, kind="wina", transform=True)


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["k-gate", "stacked"])
def test_smollm2_wina_transform_is_invariant(transform: str) -> None:
    """The rotated SmolLM2 (fold + per-boundary SVD bases + shortcut blocks) at 0% sparsity gives the original logits."""
    from tensorslim.models import load_model

    model, _ = load_model("smollm2-135m")
    ids = torch.randint(100, 10_000, (1, 64), generator=torch.Generator().manual_seed(_seed()))
    with torch.no_grad():
        ref = model(ids).logits
        apply_activation_sparsity(model, None, None, 0.0, kind="wina", transform=transform)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-3
