"""tensorslim: compress the weight matrices of neural networks without retraining.

Importing the package is cheap; the public verbs are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "tensorslim.models",
    "get_adapter": "tensorslim.models",
    "calibration_data": "tensorslim.calib.data",
    "sample_from_model": "tensorslim.calib.data",
    "compress": "tensorslim.api",
    "evaluate": "tensorslim.api",
    "model_size": "tensorslim.api",
    "IntGroup": "tensorslim.formats",
    "Sum": "tensorslim.formats",
    "parse_format": "tensorslim.formats",
    "CompressedLinear": "tensorslim.formats",
    "RTN": "tensorslim.methods",
    "build_method": "tensorslim.methods",
    "Plan": "tensorslim.plan",
    "Rule": "tensorslim.plan",
}


def __getattr__(name: str) -> Any:
    import importlib

    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tensorslim' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
