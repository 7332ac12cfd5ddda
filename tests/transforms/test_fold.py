import pytest
import torch
from torch import nn

from tensorslim.errors import UnsupportedModelError
from tensorslim.models import get_adapter, tiny_model
from tensorslim.transforms import RMSNorm, fold_norms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_fold_keeps_outputs(arch: str) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_model(arch, seed=seed)
    adapter = get_adapter(model)
    ids = _ids(seed)
    with torch.no_grad():
        ref = model(ids).logits
        fold_norms(model, adapter)
        out = model(ids).logits
    assert _rel(out, ref) < 1e-4
    block = adapter.get_blocks(model)[0]
    target = 1.0 - adapter.norm_weight_offset
    assert torch.allclose(block.get_submodule(adapter.group_norms[0]).weight, torch.tensor(target))
    # folding twice changes nothing more
    with torch.no_grad():
        fold_norms(model, adapter)
        assert _rel(model(ids).logits, ref) < 1e-4


def test_fold_unties_head() -> None:
    model = tiny_model("llama", seed=3)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    model.config.tie_word_embeddings = True
    adapter = get_adapter(model)
    ids = _ids(3)
    with torch.no_grad():
        ref = model(ids).logits
        fold_norms(model, adapter)
        out = model(ids).logits
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings
    assert _rel(out, ref) < 1e-4


def test_fold_converts_layernorm_to_rmsnorm() -> None:
    """A llama whose norms are LayerNorms with random gain and bias: mean subtraction is baked into the stream."""
    seed = int(torch.randint(0, 10_000, ()))
    model = tiny_model("llama", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for block in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            ln = nn.LayerNorm(64, eps=1e-5)
            ln.weight.data = 1 + 0.3 * torch.randn(64, generator=g)
            ln.bias.data = 0.3 * torch.randn(64, generator=g)
            setattr(block, name, ln)
    model.model.norm = nn.LayerNorm(64)
    model.model.norm.bias.data = 0.2 * torch.randn(64, generator=g)
    adapter = get_adapter(model)
    ids = _ids(seed)
    with torch.no_grad():
        ref = model(ids).logits
        fold_norms(model, adapter)
        out = model(ids).logits
    assert isinstance(model.model.layers[0].input_layernorm, RMSNorm)
    assert isinstance(model.model.norm, RMSNorm)
    assert _rel(out, ref) < 1e-4
    # the residual stream is now zero-mean: embedding rows and writer columns are centred
    assert model.model.embed_tokens.weight.mean(-1).abs().max() < 1e-5


def test_fold_refuses_post_norm() -> None:
    model = tiny_model("bert")
    with pytest.raises(UnsupportedModelError):
        fold_norms(model, get_adapter(model))
