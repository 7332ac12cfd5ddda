import itertools

import pytest
import torch
from torch import nn

from tensorslim.errors import ConfigError, UnsupportedModelError
from tensorslim.models import get_adapter, tiny_model
from tensorslim.runtime import ActSparseLinear, apply_activation_sparsity


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


def test_wina_transform_at_zero_sparsity_is_invariant() -> None:
    seed = _seed() % 10_000
    model = tiny_model("llama", seed=seed)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids).logits
        apply_activation_sparsity(model, get_adapter(model), None, 0.0, kind="wina", transform=True)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-4
    # the SVD basis makes k_proj column-orthogonal
    k = model.model.layers[0].self_attn.k_proj.weight.detach().double()
    gram = k.T @ k
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-4)


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
    gemma = tiny_model("gemma3")
    with pytest.raises(UnsupportedModelError):
        apply_activation_sparsity(gemma, None, None, 0.4, kind="wina", transform=True)
