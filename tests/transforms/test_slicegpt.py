import pytest
import torch

from tensorslim.errors import CheckpointError, ConfigError, UnsupportedModelError
from tensorslim.models import get_adapter, tiny_model
from tensorslim.transforms import ShortcutBlock
from tensorslim.transforms.slicegpt import (
    HeadProjection,
    apply_slicegpt,
    is_sliced_folder,
    load_sliced,
    pca_basis,
    save_sliced,
    sequential_bases,
    sliced_width,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _tied_llama(seed: int):
    """The tiny llama with tied embeddings (as SmolLM2) and non-trivial norm gains."""
    import transformers as hf

    untied = tiny_model("llama", seed=seed)
    cfg = untied.config
    cfg.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hf.LlamaForCausalLM(cfg).eval()
    sd = {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


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


@pytest.mark.parametrize("basis", ["global", "block"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "tied-llama"])
def test_zero_slicing_is_invariant(arch: str, basis: str) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    model = _tied_llama(seed) if arch == "tied-llama" else tiny_model(arch, seed=seed)
    ids, cal = _data(seed)
    with torch.no_grad():
        ref = model(ids).logits
        apply_slicegpt(model, get_adapter(model), cal, 0.0, basis=basis)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-4
    assert all(isinstance(b, ShortcutBlock) for b in model.model.layers) == (basis == "block")
    tied = arch == "tied-llama"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert isinstance(model.model.norm, HeadProjection) == tied


@pytest.mark.parametrize("basis", ["global", "block"])
@pytest.mark.parametrize("tied", [True, False])
def test_sliced_model_is_smaller_saves_and_reloads(tmp_path, basis: str, tied: bool) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    model = _tied_llama(seed) if tied else tiny_model("llama", seed=seed)
    n_dense = _params(model)
    ids, cal = _data(seed)
    with torch.no_grad():
        ref = model(ids).logits
    # width 50: not a multiple of the 4 heads (as SmolLM2's 456 is not of its 9): head_dim stays pinned
    apply_slicegpt(model, None, cal, 0.2, basis=basis, multiple=2)
    w = 50
    assert model.config.hidden_size == w
    assert model.model.embed_tokens.weight.shape == (128, w)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, w)
    # exact parameter count: every residual-width dimension 64 -> w, plus shortcuts (block) / the head matrix (tied)
    n_layers, inter, q_out, kv_out = 2, 128, 64, 32
    per_block = w * (q_out + 2 * kv_out) + q_out * w + 3 * w * inter + 2 * w
    expect = 128 * w * (1 if tied else 2) + n_layers * per_block + w
    expect += n_layers * 2 * w * w if basis == "block" else 0
    expect += w * w if tied else 0
    assert _params(model) == expect
    if basis == "global":
        assert _params(model) < n_dense
    with torch.no_grad():
        out = model(ids).logits
    assert 0 < _rel(out, ref) < 1.0  # an approximation, not garbage
    save_sliced(model, tmp_path)
    assert is_sliced_folder(tmp_path)
    again = load_sliced(tmp_path)
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)
    with pytest.raises(CheckpointError):
        load_sliced(tmp_path / "nowhere")


def test_sequential_bases_follow_the_sliced_stream() -> None:
    """Boundary 0's basis is the PCA of the embeddings; at full width every basis is orthogonal, and at reduced
    width the sequential bases differ from the one-pass ones after the first boundary (they see the sliced stream)."""
    from tensorslim.transforms import fold_norms
    from tensorslim.transforms.slicegpt import boundary_covariances

    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_model("llama", seed=seed)
    adapter = get_adapter(model)
    _, cal = _data(seed)
    fold_norms(model, adapter)
    covs = boundary_covariances(model, adapter, cal)
    qs = sequential_bases(model, adapter, cal, 32)
    assert len(qs) == len(covs) == 5
    one_pass = [pca_basis(c, 32) for c in covs]
    proj = lambda q: q @ q.T  # noqa: E731 - the subspace, independent of sign and order
    assert torch.allclose(proj(qs[0]), proj(one_pass[0]), atol=1e-8)
    assert not torch.allclose(proj(qs[-1]), proj(one_pass[-1]), atol=1e-3)
    full = sequential_bases(model, adapter, cal, 64)
    for q in full:
        assert torch.allclose(q.T @ q, torch.eye(64, dtype=torch.float64), atol=1e-8)


def test_more_energy_kept_means_smaller_error() -> None:
    seed = int(torch.randint(0, 10_000, ()))
    ids, cal = _data(seed)
    errs = []
    for frac in (0.125, 0.5):
        model = tiny_model("llama", seed=seed)
        with torch.no_grad():
            ref = model(ids).logits
            apply_slicegpt(model, None, cal, frac, basis="block")
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
    with pytest.raises(ConfigError):
        apply_slicegpt(model, None, cal, 0.2, basis="layer")


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
    assert model.lm_head.weight is model.model.embed_tokens.weight  # SmolLM2's tied head stays tied
