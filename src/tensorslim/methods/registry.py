"""Method names for the CLI and recipes, resolved against an allowlist."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..formats.base import Format
from .base import Method
from .grid_rtn import rtn
from .finequant import FineQuant
from .gptq import GPTQ
from .hqq import HQQ
from .rtn_imatrix import RTNImatrix
from .quantease import QuantEase
from .quantease_outliers import QuantEaseOutliers
from .prune import Magnitude, Wanda
from .sparsegpt import SparseGPT
from .mfac import MFAC
from .structured import KPSVD, MonarchProjection
from .svd import FWSVD, SVD, WhitenedSVD
from .welore import GlobalWhitenedSVD, WeLore, WeLoreWhitened

MethodFactory = Callable[..., Method]

_METHODS: dict[str, MethodFactory] = {"rtn": rtn, "gptq": GPTQ, "finequant": FineQuant, "hqq": HQQ, "rtn-imatrix": RTNImatrix, "quantease": QuantEase, "quantease-outliers": QuantEaseOutliers, "svd": SVD, "svd-whitened": WhitenedSVD, "fwsvd": FWSVD, "welore": WeLore, "welore-whitened": WeLoreWhitened, "svd-whitened-global": GlobalWhitenedSVD, "kpsvd": KPSVD, "monarch": MonarchProjection, "magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT, "mfac": MFAC}


def register_method(name: str, factory: MethodFactory) -> None:
    _METHODS[name] = factory


def known_methods() -> list[str]:
    return sorted(_METHODS)


def build_method(name: str, fmt: Format, **options: Any) -> Method:
    """``build_method("gptq", IntGroup(bits=4, group_size=64), damp=0.01)``; ConfigError for unknown names."""
    factory = _METHODS.get(name.strip().lower())
    if factory is None:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    try:
        return factory(format=fmt, **options)
    except TypeError as e:
        raise ConfigError(f"method {name!r}: {e}") from e
