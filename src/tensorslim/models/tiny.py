"""Tiny random Hugging Face models of every supported architecture, for tests. No download, a few ms each.

Shapes: hidden 64, 2 blocks, 4 query heads of 16 (2 key/value heads where the architecture has GQA), intermediate 128,
so every linear's ``in_features`` is a multiple of 32 and every intermediate size a multiple of 64.

Hugging Face initializes norms to identity (weight 1, or 0 for Gemma's ``1 + w``) and biases to zero. Here every
norm weight, norm bias and linear bias is perturbed as well, so a test of a transform that folds or moves them can
fail. The seed is applied in a forked RNG: building a tiny model leaves the global RNG state untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["tiny_model", "TINY_ARCHS"]

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "bert")

_HIDDEN = 64
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = 16
_INTERMEDIATE = 128


def _decoder_kwargs(vocab_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _build(arch: str, vocab_size: int) -> nn.Module:
    import transformers as hf

    if arch == "llama":
        return hf.LlamaForCausalLM(hf.LlamaConfig(**_decoder_kwargs(vocab_size)))
    if arch == "mistral":
        return hf.MistralForCausalLM(hf.MistralConfig(**_decoder_kwargs(vocab_size), sliding_window=None))
    if arch == "qwen2":
        return hf.Qwen2ForCausalLM(hf.Qwen2Config(**_decoder_kwargs(vocab_size), use_sliding_window=False))
    if arch == "qwen3":
        return hf.Qwen3ForCausalLM(hf.Qwen3Config(**_decoder_kwargs(vocab_size), head_dim=_HEAD_DIM))
    if arch == "gemma3":
        config = hf.Gemma3TextConfig(
            **_decoder_kwargs(vocab_size),
            head_dim=_HEAD_DIM,
            query_pre_attn_scalar=_HEAD_DIM,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )
        return hf.Gemma3ForCausalLM(config)
    if arch == "bert":
        config = hf.BertConfig(
            vocab_size=vocab_size,
            hidden_size=_HIDDEN,
            intermediate_size=_INTERMEDIATE,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            max_position_embeddings=256,
            pad_token_id=0,
        )
        return hf.BertModel(config, add_pooling_layer=False)
    raise ConfigError(f"tiny_model arch={arch!r} is not allowed; use one of {', '.join(TINY_ARCHS)}")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def _perturb(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        params = []
        if _is_norm(module):
            params = [p for p in module.parameters(recurse=False)]
        elif isinstance(module, nn.Linear) and module.bias is not None:
            params = [module.bias]
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def tiny_model(arch: str, *, seed: int = 0, vocab_size: int = 128) -> nn.Module:
    """A tiny random float32 model of ``arch`` (one of :data:`TINY_ARCHS`) in eval mode.

    ``"gemma3"`` builds the text-only ``Gemma3ForCausalLM`` (model_type ``gemma3_text``); ``"bert"`` builds a
    ``BertModel`` without pooler. The same ``seed`` gives the same weights.
    """
    if arch not in TINY_ARCHS:
        raise ConfigError(f"tiny_model arch={arch!r} is not allowed; use one of {', '.join(TINY_ARCHS)}")
    if vocab_size < 8:
        raise ConfigError(f"tiny_model vocab_size={vocab_size} is too small; use at least 8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(arch, vocab_size)
        generator = torch.Generator().manual_seed(seed + 1)
        _perturb(model, generator)
    return model.to(torch.float32).eval()


def save_tiny_causal_lm(folder, tokenizer, *, seed: int = 0, layers: int = 2):
    """Save a tiny Llama (hidden 64) sized for ``tokenizer`` plus the tokenizer as a Hugging Face folder.

    The CLI and the kill/resume scripts run on it in seconds with a real tokenizer (no download).
    """
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
