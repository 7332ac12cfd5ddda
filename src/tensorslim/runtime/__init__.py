"""Run-time model modifications: activation sparsity (WINA, TEAL)."""

from .wina import ActSparseLinear, apply_activation_sparsity, wina_bases

__all__ = ["ActSparseLinear", "apply_activation_sparsity", "wina_bases"]
