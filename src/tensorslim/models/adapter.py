"""Model adapters: what tensorslim needs to know about an architecture, as data.

An adapter names the module list of transformer blocks, the embeddings, the head, the norms and the block's linear
layers in *sub-sequential groups*: the order in which a block computes them, so the runner can solve q/k/v before o,
o before gate/up, gate/up before down. Paths are dotted attribute paths as in ``model.named_modules()``.

Every supported architecture is one table entry (:data:`_ADAPTERS`); there are no per-architecture code paths. The
entries are written for the task model Hugging Face builds for the model type (``LlamaForCausalLM`` for causal LMs,
``BertModel`` for encoders); :func:`get_adapter` re-roots them when the model at hand is the base model
(``LlamaModel``) or a task head around it (``BertForSequenceClassification``), by trying the model's
``base_model_prefix``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import ConfigError, UnsupportedModelError

__all__ = ["ModelAdapter", "get_adapter", "supported_model_types", "SUPPORTED_ARCHITECTURES"]

logger = logging.getLogger(__name__)

Kind = Literal["causal_lm", "encoder"]


@dataclass(frozen=True, kw_only=True)
class ModelAdapter:
    """A typed, frozen description of one architecture.

    ``block_norms`` lists every norm module inside a block (including per-head q/k norms where the architecture has
    them). ``group_norms`` says, for each linear group, which block norm's output is the *only* input of that group
    (pre-norm architectures), so a transform may fold the norm's scale into the group; ``None`` where the group is not
    fed by a norm alone (post-norm models such as BERT feed the normalized stream to the residual too).
    ``norm_weight_offset`` is the constant added to a norm's weight before it multiplies (Gemma computes
    ``x_hat * (1 + w)``; Llama ``x_hat * w``).
    """

    arch: str
    kind: Kind
    blocks: str
    embeddings: tuple[str, ...]
    head: str | None
    final_norm: str | None
    block_norms: tuple[str, ...]
    linear_groups: tuple[tuple[str, ...], ...]
    group_norms: tuple[str | None, ...] = ()
    norm_weight_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("causal_lm", "encoder"):
            raise ConfigError(f"ModelAdapter.kind={self.kind!r} is not allowed; use 'causal_lm' or 'encoder'")
        if not self.blocks:
            raise ConfigError("ModelAdapter.blocks must name the ModuleList of blocks, e.g. 'model.layers'")
        names = [n for group in self.linear_groups for n in group]
        if not names or any(not g for g in self.linear_groups):
            raise ConfigError(f"ModelAdapter.linear_groups={self.linear_groups!r} must be non-empty groups of names")
        if len(set(names)) != len(names):
            raise ConfigError(f"ModelAdapter.linear_groups={self.linear_groups!r} repeats a linear")
        if self.group_norms and len(self.group_norms) != len(self.linear_groups):
            raise ConfigError(
                f"ModelAdapter.group_norms has {len(self.group_norms)} entries for {len(self.linear_groups)} "
                "linear groups; give one (or None) per group, or leave it empty"
            )
        for norm in self.group_norms:
            if norm is not None and norm not in self.block_norms:
                raise ConfigError(f"ModelAdapter.group_norms names {norm!r}, which is not in block_norms")

    # ----------------------------------------------------------------------------------------------------- access

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of transformer blocks of ``model``."""
        blocks = _get(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise UnsupportedModelError(
                f"{type(model).__name__}.{self.blocks} is a {type(blocks).__name__}, not the nn.ModuleList of "
                f"blocks the {self.arch!r} adapter expects"
            )
        return blocks

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """Relative name -> module for every linear of one block, in group order.

        A module is an ``nn.Linear`` or, once compressed, a ``CompressedLinear``.
        """
        from ..formats.module import CompressedLinear

        out: dict[str, nn.Module] = {}
        for group in self.linear_groups:
            for name in group:
                module = _get(block, name)
                if not isinstance(module, (nn.Linear, CompressedLinear)):
                    raise UnsupportedModelError(
                        f"{type(block).__name__}.{name} is a {type(module).__name__}, not the nn.Linear the "
                        f"{self.arch!r} adapter expects (was the model already compressed or rewritten?)"
                    )
                out[name] = module
        return out

    def linear_names(self, model: nn.Module) -> list[str]:
        """Full dotted names of every block linear, block by block, in group order."""
        names: list[str] = []
        for i, block in enumerate(self.get_blocks(model)):
            names.extend(f"{self.blocks}.{i}.{name}" for name in self.block_linears(block))
        return names

    def group_index(self, name: str) -> int:
        """Index of the linear group holding relative linear ``name``."""
        for i, group in enumerate(self.linear_groups):
            if name in group:
                return i
        raise KeyError(f"{name!r} is not a linear of the {self.arch!r} adapter; it has {self.linear_groups!r}")


def _get(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise UnsupportedModelError(
            f"{type(root).__name__} has no submodule {path!r}; the model does not have the layout its adapter "
            f"expects ({e})"
        ) from e


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------------- the table

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_GROUPS = (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _llama_like(arch: str, *, qk_norm: bool = False) -> ModelAdapter:
    extra = ("self_attn.q_norm", "self_attn.k_norm") if qk_norm else ()
    return ModelAdapter(
        arch=arch,
        kind="causal_lm",
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        head="lm_head",
        final_norm="model.norm",
        block_norms=("input_layernorm", "post_attention_layernorm", *extra),
        linear_groups=_LLAMA_GROUPS,
        group_norms=("input_layernorm", None, "post_attention_layernorm", None),
    )


# Gemma 3 is a "sandwich" block: post_attention_layernorm normalizes the attention *output* before the residual add;
# pre_feedforward_layernorm feeds the MLP. Its RMSNorm multiplies by (1 + weight).
_GEMMA3_TEXT = ModelAdapter(
    arch="gemma3_text",
    kind="causal_lm",
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    head="lm_head",
    final_norm="model.norm",
    block_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "self_attn.q_norm",
        "self_attn.k_norm",
    ),
    linear_groups=_LLAMA_GROUPS,
    group_norms=("input_layernorm", None, "pre_feedforward_layernorm", None),
    norm_weight_offset=1.0,
)

# BERT is post-norm: each LayerNorm output is also the residual stream, so no norm feeds a group alone.
_BERT = ModelAdapter(
    arch="bert",
    kind="encoder",
    blocks="encoder.layer",
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    head=None,
    final_norm=None,
    block_norms=("attention.output.LayerNorm", "output.LayerNorm"),
    linear_groups=(
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
    group_norms=(None, None, None, None),
)

_ADAPTERS: dict[str, ModelAdapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3", qk_norm=True),
    "gemma3_text": _GEMMA3_TEXT,
    "bert": _BERT,
}

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "causal LM: Llama 2/3, SmolLM/SmolLM2, TinyLlama (LlamaForCausalLM)",
    "mistral": "causal LM: Mistral (MistralForCausalLM)",
    "qwen2": "causal LM: Qwen2 / Qwen2.5 (Qwen2ForCausalLM)",
    "qwen3": "causal LM: Qwen3 dense (Qwen3ForCausalLM; q/k norms inside attention)",
    "gemma3_text": "causal LM: Gemma 3 text-only (Gemma3ForCausalLM; sandwich norms, (1 + w) RMSNorm)",
    "bert": "encoder: BERT, MiniLM / sentence-transformers BERT (BertModel and BertFor* heads)",
}
"""Hugging Face ``config.model_type`` -> what it covers. Every key has an adapter."""

assert set(SUPPORTED_ARCHITECTURES) == set(_ADAPTERS)


def supported_model_types() -> tuple[str, ...]:
    """The ``config.model_type`` values tensorslim has adapters for."""
    return tuple(_ADAPTERS)


def adapter_for_type(model_type: str) -> ModelAdapter:
    """The adapter template for a Hugging Face ``model_type`` (paths rooted at the task model)."""
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(_unsupported_message(model_type)) from None


def _unsupported_message(model_type: object) -> str:
    listing = "; ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
    return f"model_type {model_type!r} is not supported. Supported model types: {listing}"


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type`` and rooted at ``model``.

    Raises :class:`UnsupportedModelError` when the model type has no adapter, or when the model's modules do not
    have the layout the adapter describes.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; tensorslim needs a Hugging Face transformers model. "
            + _unsupported_message(None)
        )
    template = adapter_for_type(model_type)
    for candidate in _rootings(template, getattr(model, "base_model_prefix", "") or ""):
        if _has(model, candidate.blocks) and isinstance(model.get_submodule(candidate.blocks), nn.ModuleList):
            resolved = _drop_absent(candidate, model)
            logger.debug("adapter %s rooted at %r for %s", model_type, resolved.blocks, type(model).__name__)
            return resolved
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type {model_type!r}) has no ModuleList of blocks at {template.blocks!r} "
        f"or under its base model; tensorslim cannot find its transformer blocks"
    )


def _rootings(template: ModelAdapter, prefix: str) -> list[ModelAdapter]:
    """The template as written, with ``prefix.`` added (task head around a base model) and stripped (base model)."""
    out = [template]
    if not prefix:
        return out
    dot = prefix + "."
    out.append(_reroot(template, lambda p: dot + p))
    if template.blocks.startswith(dot):
        out.append(_reroot(template, lambda p: p[len(dot) :] if p.startswith(dot) else p))
    return out


def _reroot(a: ModelAdapter, f) -> ModelAdapter:  # noqa: ANN001 - a path -> path function
    return dataclasses.replace(
        a,
        blocks=f(a.blocks),
        embeddings=tuple(f(p) for p in a.embeddings),
        head=None if a.head is None else f(a.head),
        final_norm=None if a.final_norm is None else f(a.final_norm),
    )


def _drop_absent(a: ModelAdapter, model: nn.Module) -> ModelAdapter:
    """Model-level parts the model does not have (the head of a base model) become None / are left out."""
    return dataclasses.replace(
        a,
        embeddings=tuple(p for p in a.embeddings if _has(model, p)),
        head=a.head if a.head is not None and _has(model, a.head) else None,
        final_norm=a.final_norm if a.final_norm is not None and _has(model, a.final_norm) else None,
    )
