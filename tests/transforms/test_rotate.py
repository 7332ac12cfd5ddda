import pytest
import torch

from tensorslim.errors import ConfigError, UnsupportedModelError
from tensorslim.models import get_adapter, tiny_model
from tensorslim.transforms import ShortcutBlock, boundary_count, fold_norms, random_orthogonal, rotate_residual


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _setup(arch: str, seed: int):
    model = tiny_model(arch, seed=seed)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(ids).logits
    fold_norms(model, adapter)
    return model, adapter, ids, ref


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_one_rotation_keeps_outputs(arch: str) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    model, adapter, ids, ref = _setup(arch, seed)
    rotate_residual(model, adapter, random_orthogonal(64, seed=seed))
    assert not any(isinstance(b, ShortcutBlock) for b in adapter.get_blocks(model))
    with torch.no_grad():
        out = model(ids).logits
    assert _rel(out, ref) < 1e-4
    # the rotation really changed the weights
    assert not torch.allclose(model.model.embed_tokens.weight, tiny_model(arch, seed=seed).model.embed_tokens.weight)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_boundary_rotation_uses_shortcuts(arch: str) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    model, adapter, ids, ref = _setup(arch, seed)
    n = boundary_count(model, adapter)
    rotate_residual(model, adapter, [random_orthogonal(64, seed=seed + k) for k in range(n)])
    blocks = adapter.get_blocks(model)
    assert all(isinstance(b, ShortcutBlock) for b in blocks)
    with torch.no_grad():
        out = model(ids).logits
        assert _rel(out, ref) < 1e-4
        # generation with a KV cache goes through the shortcut blocks too. The attention mask is explicit:
        # without it transformers masks every prompt token equal to the pad id (0 here), which a random prompt
        # may contain. min_new_tokens: a random model may emit its end-of-sequence token early.
        prompt = ids[:1, :4]
        gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert gen.sequences.shape == (1, 7)
        # each cached step's logits equal an uncached forward of the same prefix
        cached = torch.stack([step[0] for step in gen.logits])
        full = model(gen.sequences[:, :-1]).logits[0, 3:]
    assert _rel(cached, full) < 1e-4
    # and each step picked the token that forward picks (with the end-of-sequence token barred, as min_new_tokens
    # bars it in generate)
    full[:, model.generation_config.eos_token_id] = float("-inf")
    assert torch.equal(full.argmax(-1), gen.sequences[0, 4:])


def test_rotation_without_fold_or_bad_basis_is_refused() -> None:
    model = tiny_model("llama", seed=1)
    adapter = get_adapter(model)
    with pytest.raises(ConfigError, match="fold_norms"):
        rotate_residual(model, adapter, random_orthogonal(64))
    fold_norms(model, adapter)
    with pytest.raises(ConfigError, match="orthonormal"):
        rotate_residual(model, adapter, torch.randn(64, 64, dtype=torch.float64))
    with pytest.raises(ConfigError, match="boundaries"):
        rotate_residual(model, adapter, [random_orthogonal(64)] * 3)


def test_rotation_refuses_sandwich_norms() -> None:
    model = tiny_model("gemma3")
    adapter = get_adapter(model)
    fold_norms(model, adapter)
    with pytest.raises(UnsupportedModelError):
        rotate_residual(model, adapter, random_orthogonal(64))
