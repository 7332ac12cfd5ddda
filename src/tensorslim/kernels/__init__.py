"""Kernels: fast multiplies for stored formats (Triton, behind ``torch.library`` custom ops) and their references.

Importing this package imports neither Triton nor the ops: :func:`linear` (the dispatcher) loads them on the first
CUDA call. See ``docs/kernels.md`` for the paths, layouts and measured speeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..formats.base import CompressedWeight

__all__ = ["kernel_reason", "linear", "reference_linear"]


def linear(cw: "CompressedWeight", x: "torch.Tensor", bias: "torch.Tensor | None" = None) -> "torch.Tensor":
    """``x @ W^T + bias`` by the fastest correct path (kernel on CUDA where one fits, else the reference)."""
    from .dispatch import linear as _linear

    return _linear(cw, x, bias)


def kernel_reason(cw: "CompressedWeight", x: "torch.Tensor | None" = None) -> str | None:
    """``None`` if a kernel runs ``cw`` for ``x``, else why the reference path runs (for ``inspect`` and reports)."""
    from .dispatch import kernel_reason as _reason

    return _reason(cw, x)


def __getattr__(name: str) -> Any:
    if name == "reference_linear":
        from .reference import reference_linear

        return reference_linear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
