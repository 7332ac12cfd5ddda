import pytest
import torch

from tensorslim.calib.gradients import collect_gradients, prepare_mfac
from tensorslim.errors import CalibrationError, ConfigError
from tensorslim.formats import parse_format
from tensorslim.methods import build_method
from tensorslim.methods.mfac import MFAC, fisher_inverse_apply, fisher_inverse_diag, mfac_prune
from tensorslim.models import tiny_model
from tensorslim.stats import LayerStats


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def test_inverse_fisher_matches_dense_inverse() -> None:
    g = torch.Generator().manual_seed(_seed())
    nb, m, b, damp = 3, 5, 16, 1e-2
    grads = torch.randn(nb, m, b, generator=g, dtype=torch.float64)
    x = torch.randn(nb, b, generator=g, dtype=torch.float64)
    for k in range(nb):
        f = damp * torch.eye(b, dtype=torch.float64) + grads[k].T @ grads[k] / m
        finv = torch.linalg.inv(f)
        assert torch.allclose(fisher_inverse_diag(grads, damp)[k], finv.diagonal(), rtol=1e-9)
        assert torch.allclose(fisher_inverse_apply(grads, x, damp)[k], finv @ x[k], rtol=1e-9)


def test_single_weight_obs_step_is_the_closed_form() -> None:
    """Pruning one weight: the update is -w_q F^{-1} e_q / [F^{-1}]_qq, the optimum of the quadratic model."""
    g = torch.Generator().manual_seed(_seed())
    m, d, damp = 6, 8, 1e-3
    grads = torch.randn(m, 1, d, generator=g)
    w = torch.randn(1, d, generator=g)
    fmt = parse_format("sparse:0.125:float32")
    out = mfac_prune(w, grads, fmt, damp=damp, block=d).decode().double()[0]
    f = damp * torch.eye(d, dtype=torch.float64) + grads[:, 0].double().T @ grads[:, 0].double() / m
    finv = torch.linalg.inv(f)
    sal = w[0].double() ** 2 / (2 * finv.diagonal())
    q = int(sal.argmin())
    ref = w[0].double() - w[0, q].double() * finv[:, q] / finv[q, q]
    ref[q] = 0.0
    assert out[q] == 0
    assert torch.allclose(out, ref.float().double(), atol=1e-5)
    # the update lowers the quadratic loss versus plain zeroing
    zero = w[0].double().clone()
    zero[q] = 0
    loss = lambda v: float((v - w[0].double()) @ f @ (v - w[0].double()))  # noqa: E731
    assert loss(out) <= loss(zero) + 1e-12


def test_gradient_pass_and_end_to_end_pruning() -> None:
    seed = _seed() % 10_000
    model = tiny_model("llama", seed=seed)
    batches = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    grads = collect_gradients(model, batches, names, m=3)
    assert grads[names[0]].shape == (3, 64, 128)
    assert all(p.grad is None for p in model.parameters())
    fmt = parse_format("sparse:2:4")
    assign = prepare_mfac(model, {n: MFAC(format=fmt, damp=1e-4) for n in names}, batches, m=3, max_bytes=1)
    assert torch.equal(assign[names[0]].gradients, grads[names[0]])  # chunked: one layer at a time, same gradients
    for n in names:
        w = model.get_submodule(n).weight.detach()
        cw = assign[n].apply(w, LayerStats(), layer=n)
        cw.validate()
        assert cw.sparsity() == 0.5


def test_errors() -> None:
    fmt = parse_format("sparse:0.5")
    with pytest.raises(CalibrationError):
        build_method("mfac", fmt).apply(torch.randn(4, 32), LayerStats())
    with pytest.raises(ConfigError):
        MFAC(format=fmt, damp=0)
    with pytest.raises(ConfigError):
        mfac_prune(torch.randn(3, 10), torch.randn(2, 3, 10), fmt, block=16)
