"""SliceGPT (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024).

Steps: (1) fold the norms (:func:`~tensorslim.transforms.fold.fold_norms`); (2) find orthonormal bases of the
residual stream from calibration activations: the eigenvectors of ``C = sum_t x_t^T x_t`` (float64, damped by
``0.01 * mean(diag C)``) by descending eigenvalue; (3) keep the first ``d'`` of them, ``Q`` ``[d, d']``, and
rotate/slice with :func:`~tensorslim.transforms.rotate.rotate_residual` (readers ``W Q``, writers ``Q^T W``).
``d' = floor((1 - fraction) * d)`` rounded down to a multiple of 8, as the reference does.

Two kinds of basis (``basis=``):

* ``"global"`` (default): one basis for the whole residual stream, the PCA of the sum of every boundary's covariance
  (each normalized to unit trace, so late layers with large activations do not dominate). No shortcut matrices:
  the sliced model is the model's own Hugging Face class with ``hidden_size = d'``. The smallest and fastest model.
* ``"block"`` (the paper's): one basis per boundary (attention input and MLP input of each block, head input),
  computed *sequentially* as the reference does: boundary ``k``'s PCA is taken on the stream produced with every
  earlier boundary already sliced (projected onto its kept subspace). Blocks become
  :class:`~tensorslim.transforms.rotate.ShortcutBlock` with two ``d' x d'`` shortcut matrices each
  (``2 * L * d'^2`` more parameters).

Tied embeddings (SmolLM2) stay tied. Folding the final norm gain ``g`` into the head would untie it
(``+ vocab * d'`` parameters); instead, with ``Q_0`` the embedding basis and ``Q_h`` the head-input basis,
``logits = n(h Q_h) [Q_h^T diag(g) Q_0] (E Q_0)^T``: the head stays the (rotated, sliced) embedding and the gain goes
into a ``d' x d'`` matrix applied after the final norm (:class:`HeadProjection`). With slicing this also drops the
embedding components outside the kept subspace from the head (exact at ``fraction = 0``).

The result has ``config.hidden_size = d'`` (``head_dim`` pinned), RMSNorm epsilon rescaled by ``d/d'`` (norm gains
``sqrt(d/d')`` so norms still divide by the original width) and a ``tensorslim_slicegpt`` config entry.
:func:`save_sliced` writes it with ``save_pretrained``; :func:`load_sliced` rebuilds it (no pickle).
Limits: Llama-like pre-norm causal LMs only; the FFN width and the heads are untouched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..models.adapter import ModelAdapter, get_adapter
from .fold import fold_norms
from .rotate import ShortcutBlock, block_parts, boundary_count, check_rotatable, rotate_residual

__all__ = ["HeadProjection", "apply_slicegpt", "boundary_covariances", "load_sliced", "pca_basis", "save_sliced",
           "sequential_bases", "sliced_width"]

logger = logging.getLogger(__name__)
_META = "tensorslim_slicegpt"
Basis = Literal["global", "block"]


class HeadProjection(nn.Module):
    """The final norm followed by a ``[d', d']`` matrix (``norm(x) @ proj``): it carries the final norm's gain and the
    basis change into the embedding's basis, so the head can stay tied to the embedding."""

    def __init__(self, norm: nn.Module, proj: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.proj = nn.Parameter(proj, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # what code that inspects "the final norm's gain" expects to find
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) @ self.proj.to(x.dtype)


def sliced_width(d: int, fraction: float, multiple: int = 8) -> int:
    """Kept residual width: ``floor((1 - fraction) * d)`` rounded down to ``multiple`` (at least ``multiple``)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ConfigError(f"SliceGPT slicing fraction must be a number in [0, 1), got {fraction!r}")
    if fraction == 0:
        return d
    keep = int(math.floor((1.0 - fraction) * d + 1e-9))
    return max(multiple, keep // multiple * multiple)


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).double()
    return x.T @ x


@torch.no_grad()
def boundary_covariances(model: nn.Module, adapter: ModelAdapter, batches: torch.Tensor, *,
                         batch_size: int = 4) -> list[torch.Tensor]:
    """``sum x^T x`` (float64 ``[d, d]``) of the residual stream at each boundary, in :func:`boundary_count` order,
    from one pass over the (unsliced) model."""
    check_rotatable(adapter)
    n1, _, n2, _ = block_parts(adapter)
    points: list[nn.Module] = []
    for block in adapter.get_blocks(model):
        points += [block.get_submodule(n1), block.get_submodule(n2)]
    if adapter.final_norm is None:
        raise ConfigError(f"SliceGPT needs the final norm of the {adapter.arch!r} model")
    points.append(model.get_submodule(adapter.final_norm))
    covs: list[torch.Tensor | None] = [None] * len(points)

    def hook(k: int):
        def fn(_module: nn.Module, args: tuple) -> None:
            c = _gram(args[0])
            covs[k] = c if covs[k] is None else covs[k] + c

        return fn

    from ..calib.runner import forward_with_hooks

    forward_with_hooks(model, batches, batch_size, [(p, hook(k)) for k, p in enumerate(points)])
    if any(c is None for c in covs):
        raise ConfigError("SliceGPT: no calibration activations reached every boundary; give at least one batch")
    return [c.cpu() for c in covs]  # type: ignore[union-attr]


def pca_basis(cov: torch.Tensor, width: int, damp: float = 0.01) -> torch.Tensor:
    """The ``width`` leading eigenvectors (descending eigenvalue) of the damped covariance, float64 ``[d, width]``."""
    c = cov.double().clone()
    c.diagonal().add_(damp * float(c.diagonal().mean()))
    vals, vecs = torch.linalg.eigh(c)
    return vecs[:, torch.argsort(vals, descending=True)[:width]].contiguous()


@torch.inference_mode()
def sequential_bases(model: nn.Module, adapter: ModelAdapter, batches: torch.Tensor, width: int, *,
                     damp: float = 0.01, batch_size: int = 4) -> list[torch.Tensor]:
    """One ``[d, width]`` basis per boundary of a *folded* model, each the PCA of the stream produced with every
    earlier boundary already sliced (the reference's sequential variant). Slicing boundary ``k`` with basis ``Q`` is,
    in the original coordinates, projecting the stream onto ``Q Q^T`` (readers and skip connection alike), so the
    sliced model's calibration signals are computed here without rewriting any weight."""
    from ..calib.runner import capture_block_inputs

    check_rotatable(adapter)
    n1, attn_name, n2, mlp_name = block_parts(adapter)
    dev = next(model.parameters()).device
    cached = capture_block_inputs(model, adapter, batches, batch_size=batch_size, device=dev)
    qs: list[torch.Tensor] = []

    def slice_here(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        q = pca_basis(sum(_gram(x) for x in xs).cpu(), width, damp)  # type: ignore[arg-type]
        qs.append(q)
        p = (q @ q.T).to(dev)
        return [(x.double() @ p).to(x.dtype) for x in xs]

    xs = [c.hidden for c in cached]
    for block in adapter.get_blocks(model):
        xs = slice_here(xs)
        attn, mlp = block.get_submodule(attn_name), block.get_submodule(mlp_name)
        norm1, norm2 = block.get_submodule(n1), block.get_submodule(n2)
        mids = []
        for x, c in zip(xs, cached):
            a = attn(hidden_states=norm1(x), **c.kwargs)
            mids.append(x + (a[0] if isinstance(a, tuple) else a))
        mids = slice_here(mids)
        xs = [m + mlp(norm2(m)) for m in mids]
    slice_here(xs)
    assert len(qs) == boundary_count(model, adapter)
    return qs


def _tied(model: nn.Module, adapter: ModelAdapter) -> bool:
    if adapter.head is None:
        return False
    head = model.get_submodule(adapter.head).weight
    emb = model.get_submodule(adapter.embeddings[0]).weight
    return head is emb or head.data_ptr() == emb.data_ptr()


@torch.no_grad()
def _retie_head(model: nn.Module, adapter: ModelAdapter, gain: torch.Tensor, q_emb: torch.Tensor,
                q_head: torch.Tensor) -> None:
    """Replace the folded, untied head by the (rotated, sliced) embedding and put ``Q_h^T diag(g) Q_0`` after the
    final norm (see the module note)."""
    emb = model.get_submodule(adapter.embeddings[0])
    head = model.get_submodule(adapter.head)  # type: ignore[arg-type]
    proj = (q_head.T * gain[None, :]) @ q_emb
    head.weight = emb.weight
    norm_path = adapter.final_norm
    assert norm_path is not None
    norm = model.get_submodule(norm_path)
    parent, _, leaf = norm_path.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    setattr(holder, leaf, HeadProjection(norm, proj.to(dtype=emb.weight.dtype, device=emb.weight.device)))
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = True
        text = getattr(config, "get_text_config", None)
        if callable(text):
            text().tie_word_embeddings = True


@torch.no_grad()
def apply_slicegpt(model: nn.Module, adapter: ModelAdapter | None, calib_batches: torch.Tensor, fraction: float, *,
                   basis: Basis = "global", damp: float = 0.01, batch_size: int = 4, multiple: int = 8,
                   keep_tied: bool = True) -> nn.Module:
    """Slice ``fraction`` of the residual width off ``model`` (in place; returns it). ``calib_batches``: LongTensor
    ``[n, seq]`` of token ids. ``basis``: ``"global"`` (one PCA basis, no shortcuts) or ``"block"`` (sequential
    per-boundary bases with shortcut matrices). ``keep_tied``: a model with tied embeddings keeps them tied (through
    :class:`HeadProjection`). ``fraction=0`` is a pure rotation (outputs unchanged up to float error)."""
    adapter = adapter or get_adapter(model)
    check_rotatable(adapter)
    if basis not in ("global", "block"):
        raise ConfigError(f"SliceGPT basis must be 'global' or 'block', got {basis!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"SliceGPT multiple must be a positive integer, got {multiple!r}")
    d = model.get_submodule(adapter.embeddings[0]).weight.shape[1]
    width = sliced_width(d, fraction, multiple)
    if calib_batches.ndim != 2 or calib_batches.numel() == 0:
        raise ConfigError(f"SliceGPT calib_batches must be a non-empty LongTensor [n, seq], got {tuple(calib_batches.shape)}")
    config = getattr(model, "config", None)
    head_dim = None
    if config is not None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    final = model.get_submodule(adapter.final_norm) if adapter.final_norm else None
    retie = keep_tied and _tied(model, adapter) and final is not None and getattr(final, "bias", None) is None
    gain = final.weight.detach().double().cpu() + adapter.norm_weight_offset if retie else None  # type: ignore[union-attr]
    fold_norms(model, adapter)
    if basis == "global":
        covs = boundary_covariances(model, adapter, calib_batches, batch_size=batch_size)
        total = sum(c / c.trace() for c in covs)
        q = pca_basis(total, width, damp)  # type: ignore[arg-type]
        qs: list[torch.Tensor] = [q] * boundary_count(model, adapter)
        rotate_residual(model, adapter, q)
    else:
        qs = sequential_bases(model, adapter, calib_batches, width, damp=damp, batch_size=batch_size)
        rotate_residual(model, adapter, qs)
    if retie:
        _retie_head(model, adapter, gain, qs[0], qs[-1])  # type: ignore[arg-type]
    logger.info("SliceGPT %s (%s basis): width %d -> %d, head %s", adapter.arch, basis, d, width,
                "tied" if retie else "untied")
    if config is not None:
        eps_name = "rms_norm_eps" if hasattr(config, "rms_norm_eps") else None
        base_eps = float(getattr(config, eps_name)) if eps_name else None
        config.head_dim = head_dim
        config.hidden_size = width
        if eps_name:
            setattr(config, eps_name, base_eps * d / width)
        setattr(config, _META, {"original_hidden_size": d, "fraction": float(fraction), "width": width,
                                "basis": basis, "tied_head": bool(retie)})
    return model


def save_sliced(model: nn.Module, path: str | Path, *, tokenizer: object | None = None) -> None:
    """Write a sliced model as a Hugging Face-style folder: ``config.json`` (with the ``tensorslim_slicegpt`` entry)
    and ``model.safetensors`` (a tied head stored once), plus the tokenizer's files under ``tokenizer/``;
    :func:`load_sliced` reads it.
    Written directly rather than by ``save_pretrained``, which refuses models loaded from GGUF."""
    import json

    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not getattr(config, _META, None):
        raise CheckpointError(f"{type(model).__name__} is not a sliced Hugging Face model (run apply_slicegpt first)")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)  # a GGUF source's loader setting, not a property of the sliced weights
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied parameters: stored once (load_sliced re-ties them)
            continue
        seen[id(t)] = name
        state[name] = t.detach().cpu().contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        # in its own folder: AutoTokenizer reads a config.json beside it, and transformers refuses the sliced width
        tokenizer.save_pretrained(str(out / "tokenizer"))


def is_sliced_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a config written by :func:`save_sliced` (without building anything)."""
    import json

    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and _META in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_sliced(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model written by :func:`save_sliced`: modules from its config, shortcut blocks and head projection,
    safetensors weights (no pickle)."""
    import transformers as hf
    from safetensors.torch import load_file

    import json

    p = Path(path)
    try:
        raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: no readable Hugging Face config ({e})") from e
    meta = raw.get(_META) if isinstance(raw, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("original_hidden_size"), int):
        raise CheckpointError(f"{p} is not a SliceGPT checkpoint (its config has no valid {_META!r} entry)")
    try:
        # transformers validates hidden_size % heads at construction (head_dim is pinned, so a sliced width need not
        # divide): build with the original width, then set the sliced one, as apply_slicegpt left it
        width = int(raw["hidden_size"])
        config = hf.AutoConfig.for_model(**{**raw, "hidden_size": meta["original_hidden_size"]})
        config.hidden_size = width
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: the config cannot be built ({type(e).__name__}: {e})") from e
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    model = hf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    names = block_parts(adapter)
    blocks = adapter.get_blocks(model)
    w = config.hidden_size
    for i, block in enumerate(blocks):
        if f"{adapter.blocks}.{i}.attn_shortcut" in state:
            z = torch.zeros(w, w, dtype=dtype)
            blocks[i] = ShortcutBlock(block, names, z, z.clone())
    if adapter.final_norm and f"{adapter.final_norm}.proj" in state:
        parent, _, leaf = adapter.final_norm.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, HeadProjection(model.get_submodule(adapter.final_norm), torch.zeros(w, w, dtype=dtype)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(meta.get("tied_head"))
    if tied and adapter.head is not None:
        missing = [k for k in missing if k != f"{adapter.head}.weight"]
        model.get_submodule(adapter.head).weight = model.get_submodule(adapter.embeddings[0]).weight
    if missing or unexpected:
        raise CheckpointError(f"{p}: weights do not match the sliced model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
