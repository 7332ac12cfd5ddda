"""Run-time model modifications: activation sparsity (WINA, TEAL)."""

from .act_alloc import greedy_allocation
from .wina import ActSparseLinear, apply_activation_sparsity, realized_sparsity, reset_counts, wina_bases

__all__ = ["ActSparseLinear", "apply_activation_sparsity", "greedy_allocation", "realized_sparsity", "reset_counts",
           "wina_bases"]
