"""Adapters find exactly the block linears of each tiny architecture; tiny models are what other tests build on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorslim.errors import ConfigError, UnsupportedModelError
from tensorslim.models import (
    SUPPORTED_ARCHITECTURES,
    TINY_ARCHS,
    ModelAdapter,
    get_adapter,
    supported_model_types,
    tiny_model,
)

DECODER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
BERT_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
EXPECTED = {
    "llama": ("llama", "model.layers", DECODER_LINEARS),
    "mistral": ("mistral", "model.layers", DECODER_LINEARS),
    "qwen2": ("qwen2", "model.layers", DECODER_LINEARS),
    "qwen3": ("qwen3", "model.layers", DECODER_LINEARS),
    "gemma3": ("gemma3_text", "model.layers", DECODER_LINEARS),
    "bert": ("bert", "encoder.layer", BERT_LINEARS),
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {arch: tiny_model(arch) for arch in TINY_ARCHS}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapter_finds_exactly_the_block_linears(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    model_type, blocks, rel = EXPECTED[arch]
    adapter = get_adapter(model)
    assert adapter.arch == model_type == model.config.model_type
    assert adapter.blocks == blocks
    expected = [f"{blocks}.{i}.{name}" for i in range(2) for name in rel]
    assert adapter.linear_names(model) == expected  # block by block, in group order
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in expected)
    # every linear of the model is a block linear, except the output head
    all_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all_linears - set(expected) == ({adapter.head} if adapter.head else set())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_block_linears_are_the_model_modules_in_group_order(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    adapter = get_adapter(model)
    block = adapter.get_blocks(model)[1]
    linears = adapter.block_linears(block)
    assert list(linears) == [n for group in adapter.linear_groups for n in group]
    assert all(linears[n] is block.get_submodule(n) for n in linears)
    assert [adapter.group_index(n) for n in linears] == sorted(adapter.group_index(n) for n in linears)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_named_parts_exist(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    adapter = get_adapter(model)
    assert len(adapter.get_blocks(model)) == 2
    for path in adapter.embeddings:
        assert isinstance(model.get_submodule(path), nn.Embedding)
    assert len(adapter.embeddings) == (3 if arch == "bert" else 1)
    if adapter.kind == "causal_lm":
        assert isinstance(model.get_submodule(adapter.head), nn.Linear)
        assert adapter.final_norm is not None
        model.get_submodule(adapter.final_norm)
    else:
        assert adapter.head is None
    block = adapter.get_blocks(model)[0]
    for norm in adapter.block_norms:
        assert "norm" in type(block.get_submodule(norm)).__name__.lower()
    assert len(adapter.group_norms) == len(adapter.linear_groups)


def test_arch_specific_data(models: dict[str, nn.Module]) -> None:
    assert "self_attn.q_norm" in get_adapter(models["qwen3"]).block_norms
    gemma = get_adapter(models["gemma3"])
    assert gemma.group_norms[2] == "pre_feedforward_layernorm"
    assert "post_feedforward_layernorm" in gemma.block_norms
    assert gemma.norm_weight_offset == 1.0
    assert get_adapter(models["llama"]).group_norms == ("input_layernorm", None, "post_attention_layernorm", None)
    assert get_adapter(models["bert"]).group_norms == (None, None, None, None)  # post-norm: nothing to fold


def test_bert_with_task_head_is_rerooted_under_bert_prefix() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    base = tiny_model("bert")
    model = BertForSequenceClassification(BertConfig(**base.config.to_dict()))
    adapter = get_adapter(model)
    assert adapter.blocks == "bert.encoder.layer"
    assert adapter.embeddings[0] == "bert.embeddings.word_embeddings"
    assert adapter.linear_names(model)[0] == "bert.encoder.layer.0.attention.self.query"
    assert len(adapter.linear_names(model)) == 12


def test_base_decoder_model_without_head_is_rerooted() -> None:
    base = tiny_model("llama").model  # LlamaModel: no "model." prefix, no lm_head
    adapter = get_adapter(base)
    assert adapter.blocks == "layers"
    assert adapter.head is None
    assert adapter.final_norm == "norm"
    assert adapter.embeddings == ("embed_tokens",)
    assert adapter.linear_names(base)[:2] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]


def test_unsupported_gpt2_lists_supported_types() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported") as info:
        get_adapter(model)
    for model_type in supported_model_types():
        assert model_type in str(info.value)


def test_model_without_config_is_unsupported() -> None:
    with pytest.raises(UnsupportedModelError, match="no config.model_type"):
        get_adapter(nn.Sequential(nn.Linear(4, 4)))


def test_replaced_linear_is_reported() -> None:
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj = nn.Identity()
    with pytest.raises(UnsupportedModelError, match="mlp.up_proj is a Identity"):
        get_adapter(model).linear_names(model)


def test_adapter_validates_its_fields() -> None:
    base = dict(arch="x", kind="causal_lm", blocks="layers", embeddings=(), head=None, final_norm=None,
                block_norms=("n",))  # fmt: skip
    with pytest.raises(ConfigError, match="repeats"):
        ModelAdapter(**base, linear_groups=(("a",), ("a",)))
    with pytest.raises(ConfigError, match="kind"):
        ModelAdapter(**{**base, "kind": "seq2seq"}, linear_groups=(("a",),))
    with pytest.raises(ConfigError, match="group_norms"):
        ModelAdapter(**base, linear_groups=(("a",),), group_norms=("n", None))
    with pytest.raises(ConfigError, match="not in block_norms"):
        ModelAdapter(**base, linear_groups=(("a",),), group_norms=("other",))
    adapter = ModelAdapter(**base, linear_groups=(("a", "b"),))
    with pytest.raises(AttributeError):
        adapter.blocks = "other"  # type: ignore[misc]


def test_supported_architectures_describe_every_adapter() -> None:
    assert set(SUPPORTED_ARCHITECTURES) == set(supported_model_types())
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "bert"} <= set(supported_model_types())


# --------------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_shapes_and_forward(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.intermediate_size % 64 == 0
    assert 32 <= model.config.hidden_size <= 64
    assert model.config.num_hidden_layers == 2
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert m.in_features % 32 == 0, name
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids)
    y = out.logits if adapter_kind(model) == "causal_lm" else out.last_hidden_state
    assert y.shape == (2, 7, 128 if adapter_kind(model) == "causal_lm" else 64)
    assert torch.isfinite(y).all()


def adapter_kind(model: nn.Module) -> str:
    return get_adapter(model).kind


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_seeded_and_leaves_global_rng_alone(arch: str) -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_model(arch, seed=3), tiny_model(arch, seed=3), tiny_model(arch, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_norms_and_biases_are_not_identity(models: dict[str, nn.Module], arch: str) -> None:
    model = models[arch]
    adapter = get_adapter(model)
    block = adapter.get_blocks(model)[0]
    identity = 1.0 - adapter.norm_weight_offset
    for name in adapter.block_norms:
        weight = block.get_submodule(name).weight
        assert not torch.allclose(weight, torch.full_like(weight, identity)), name
    for name, linear in adapter.block_linears(block).items():
        if linear.bias is not None:
            assert linear.bias.abs().sum() > 0, name


def test_tiny_vocab_size_and_bad_arch() -> None:
    assert tiny_model("qwen2", vocab_size=256).config.vocab_size == 256
    with pytest.raises(ConfigError, match="gpt2"):
        tiny_model("gpt2")
