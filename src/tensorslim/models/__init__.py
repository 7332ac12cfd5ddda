"""Architecture knowledge (typed adapters, mostly data) and model sources (aliases, HF folders/ids, GGUF)."""

from .adapter import SUPPORTED_ARCHITECTURES, ModelAdapter, get_adapter, supported_model_types
from .sources import ALIASES, SUPPORTED_SOURCES, load_model, resolve_alias
from .tiny import TINY_ARCHS, tiny_model

__all__ = [
    "ALIASES",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_SOURCES",
    "TINY_ARCHS",
    "ModelAdapter",
    "get_adapter",
    "load_model",
    "resolve_alias",
    "supported_model_types",
    "tiny_model",
]
