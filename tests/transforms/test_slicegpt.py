import pytest
import torch

from tensorslim.errors import CheckpointError, ConfigError, UnsupportedModelError
from tensorslim.models import get_adapter, tiny_model
from tensorslim.transforms import ShortcutBlock
from tensorslim.transforms.slicegpt import apply_slicegpt, load_sliced, pca_basis, save_sliced, sliced_width


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (2, 16), generator=g), torch.randint(3, 128, (8, 32), generator=g)


def test_sliced_width() -> None:
    assert sliced_width(576, 0.0) == 576
    assert sliced_width(576, 0.2) == 456  # floor(460.8) = 460 -> multiple of 8
    assert sliced_width(576, 0.1) == 512
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ConfigError):
            sliced_width(576, bad)


def test_pca_basis_of_diagonal_points() -> None:
    """The reference repo's test: points on the diagonal give eigenvalues (4, 0) and a pi/4 rotation."""
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    q = pca_basis(x.T @ x, 2, damp=0.0)
    assert torch.allclose(q[:, 0].abs(), torch.full((2,), 2 ** -0.5, dtype=torch.float64))
    assert torch.allclose((x @ q).pow(2).sum(0), torch.tensor([4.0 * 2, 0.0], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_zero_slicing_is_invariant(arch: str) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_model(arch, seed=seed)
    ids, cal = _data(seed)
    with torch.no_grad():
        ref = model(ids).logits
        apply_slicegpt(model, get_adapter(model), cal, 0.0)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-4
    assert all(isinstance(b, ShortcutBlock) for b in model.model.layers)


def test_sliced_model_is_smaller_saves_and_reloads(tmp_path) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_model("llama", seed=seed)
    ids, cal = _data(seed)
    with torch.no_grad():
        ref = model(ids).logits
    apply_slicegpt(model, None, cal, 0.25)
    assert model.config.hidden_size == 48
    assert model.model.embed_tokens.weight.shape == (128, 48)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)
    with torch.no_grad():
        out = model(ids).logits
    assert 0 < _rel(out, ref) < 1.0  # an approximation, not garbage
    save_sliced(model, tmp_path)
    again = load_sliced(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
    with pytest.raises(CheckpointError):
        load_sliced(tmp_path / "nowhere")


def test_more_energy_kept_means_smaller_error() -> None:
    seed = int(torch.randint(0, 10_000, ()))
    ids, cal = _data(seed)
    errs = []
    for frac in (0.125, 0.5):
        model = tiny_model("llama", seed=seed)
        with torch.no_grad():
            ref = model(ids).logits
            apply_slicegpt(model, None, cal, frac)
            errs.append(_rel(model(ids).logits, ref))
    assert errs[0] < errs[1]


def test_unsupported_architectures_are_typed_errors() -> None:
    _, cal = _data(0)
    for arch in ("bert", "gemma3"):
        model = tiny_model(arch)
        with pytest.raises(UnsupportedModelError):
            apply_slicegpt(model, get_adapter(model), cal, 0.2)
    model = tiny_model("llama")
    with pytest.raises(ConfigError):
        apply_slicegpt(model, None, cal, 1.0)


@pytest.mark.slow
def test_smollm2_rotation_only_is_invariant() -> None:
    from tensorslim.models import load_model

    model, _ = load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10_000, (1, 64), generator=g)
    cal = torch.randint(100, 10_000, (4, 64), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
        apply_slicegpt(model, None, cal, 0.0)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-3
