"""Native checkpoints (safetensors + versioned JSON manifest), resumable compression, and exporters.

``save``/``load`` are the native format; ``export(model_or_dir, to, out)`` writes GGUF, compressed-tensors or a dense
Hugging Face folder. Exporters are imported lazily so ``import tensorslim.io`` stays cheap.
"""

from .checkpoint import load, read_manifest, save

__all__ = ["export", "load", "read_manifest", "save"]


def export(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin lazy wrapper, see .exporters.export
    from .exporters import export as _export

    return _export(*args, **kwargs)
