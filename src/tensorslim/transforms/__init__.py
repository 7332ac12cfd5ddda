"""Function-preserving model rewrites: norm folding, residual-stream rotation, SliceGPT slicing."""

from .fold import RMSNorm, fold_norms, residual_writers, untie_head
from .rotate import ShortcutBlock, boundary_count, check_rotatable, random_orthogonal, rotate_residual

__all__ = [
    "RMSNorm",
    "ShortcutBlock",
    "boundary_count",
    "check_rotatable",
    "fold_norms",
    "random_orthogonal",
    "residual_writers",
    "rotate_residual",
    "untie_head",
]
