import pytest
import torch

from tensorslim.errors import ConfigError, UnsupportedModelError
from tensorslim.models.adapter import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.transforms.hadamard import RotatedMLP, apply_rotation, hadamard_matrix, rotation_matrix


@pytest.mark.parametrize("n", [1, 2, 12, 20, 64, 72, 96, 576, 1536])
def test_hadamard_matrices_are_orthogonal_with_equal_magnitudes(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_unconstructible_order_and_unknown_kind_raise():
    with pytest.raises(ConfigError, match="random"):
        hadamard_matrix(14)
    with pytest.raises(ConfigError):
        rotation_matrix("givens", 8)


def test_hadamard_spreads_outliers():
    # one large channel: after the rotation every coordinate carries 1/sqrt(n) of it, so absmax/rms drops
    x = torch.randn(256, 64, dtype=torch.float64)
    x[:, 5] *= 50
    y = x @ rotation_matrix("hadamard", 64, seed=int(torch.seed() % 1000))
    ratio = lambda t: float((t.abs().amax(1) / t.pow(2).mean(1).sqrt()).mean())  # noqa: E731
    assert ratio(y) < 0.5 * ratio(x)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_leaves_the_model_function_unchanged(arch, kind):
    model = tiny_model(arch, seed=3)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(int(torch.seed() % 2**31)))
    with torch.no_grad():
        ref = model(ids).logits.double()
        apply_rotation(model, get_adapter(model), kind, seed=int(torch.seed() % 1000))
        got = model(ids).logits.double()
    assert isinstance(model.model.layers[0].mlp, RotatedMLP)
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    # the adapter still finds every linear at its usual path (the runner and module swaps keep working)
    assert len(get_adapter(model).linear_names(model)) == 2 * 7
    with pytest.raises(ConfigError):
        apply_rotation(model, get_adapter(model), kind)


def test_unsupported_model_is_refused():
    model = tiny_model("bert")
    with pytest.raises(UnsupportedModelError):
        apply_rotation(model, get_adapter(model), "hadamard")


@pytest.mark.slow
def test_rotation_preserves_smollm2_logits():
    from tensorslim.models.sources import load_model

    model, _ = load_model("smollm2-135m")
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
        apply_rotation(model, get_adapter(model), "hadamard", seed=0)
        got = model(input_ids=ids).logits.double()
    assert float((got - ref).norm() / ref.norm()) < 1e-3
