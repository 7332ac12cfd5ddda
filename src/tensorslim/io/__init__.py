"""Native checkpoints (safetensors + versioned JSON manifest), resumable compression, and exporters.

``save``/``load`` are the native format; ``export(model_or_dir, to, out)`` writes GGUF, compressed-tensors or a dense
Hugging Face folder. Exporters are imported lazily so ``import tensorslim.io`` stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoint import load, read_manifest, save

__all__ = ["EXPORT_TARGETS", "export", "load", "read_manifest", "save"]

EXPORT_TARGETS = ("gguf", "compressed-tensors", "hf")


def export(model_or_dir: Any, to: str, out: str | os.PathLike[str], *, dequantize_unsupported: bool = False,
           tokenizer: Any = None) -> Path:
    """Export a model (or a native checkpoint folder) to ``to`` in ``EXPORT_TARGETS``; returns the written path.

    ``dequantize_unsupported``: layers whose format has no equivalent in the target are written dense instead of
    refusing the export (an :class:`ExportError` listing them). Ignored for ``hf`` (always dense).
    """
    target = str(to).strip().lower()
    if target not in EXPORT_TARGETS:
        raise ConfigError(f"export target {to!r} is not known; use one of {', '.join(EXPORT_TARGETS)}")
    model = model_or_dir
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, tok = load(model_or_dir)
        tokenizer = tokenizer if tokenizer is not None else tok
    if target == "hf":
        from .hf_export import export_hf

        return export_hf(model, out, tokenizer=tokenizer)
    if target == "gguf":
        from .gguf_export import export_gguf

        return export_gguf(model, out, tokenizer=tokenizer, dequantize_unsupported=dequantize_unsupported)
    from .ct_export import export_compressed_tensors

    return export_compressed_tensors(model, out, tokenizer=tokenizer, dequantize_unsupported=dequantize_unsupported)
