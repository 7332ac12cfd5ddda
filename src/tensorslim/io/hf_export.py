"""Dense Hugging Face folder export: every compressed layer decoded, saved with ``save_pretrained``.

For tools that know nothing about tensorslim. The decoded weights are ``decode(dtype)`` of each compressed weight (the
reference the compressed model itself computes with), in the dtype of the model's dense parameters, so the exported
model reproduces the compressed model's outputs up to that dtype (exactly, in float32). The input model is not
modified: the dense state dict is built beside it and handed to ``save_pretrained(state_dict=...)``.
Limits: the export is as large as the uncompressed model; nothing of the compression is kept.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..formats.module import CompressedLinear
from .atomic import atomic_folder

logger = logging.getLogger(__name__)


def dense_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with each CompressedLinear's weight decoded under ``<layer>.weight``."""
    sd = dict(model.state_dict())
    if dtype is None:
        floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
        dtype = floats[0] if floats else torch.float32
    for name, mod in model.named_modules():
        if isinstance(mod, CompressedLinear):
            sd[f"{name}.weight"] = mod.compressed.decode(dtype).contiguous()
    return sd


def write_hf_folder(model: nn.Module, folder: Path, sd: dict[str, torch.Tensor],
                    quantization_config: dict[str, Any] | None = None) -> None:
    """``config.json`` + ``model.safetensors`` (tied weights stored once) without ``save_pretrained``, which refuses
    models that transformers loaded from GGUF (their config carries a GGUF quantizer)."""
    from safetensors.torch import save_file

    tied = getattr(model.config, "tie_word_embeddings", False)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        if tied and k == "lm_head.weight":
            continue
        t = v.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def export_hf(model: nn.Module, out: str | os.PathLike[str], *, tokenizer: Any = None,
              dtype: torch.dtype | None = None) -> Path:
    if not hasattr(model, "save_pretrained"):
        raise ExportError(f"{type(model).__name__} is not a transformers model; cannot write a Hugging Face folder")
    sd = dense_state_dict(model, dtype)
    with atomic_folder(out) as tmp:
        write_hf_folder(model, tmp, sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    logger.info("wrote a dense Hugging Face folder to %s", out)
    return Path(out)
