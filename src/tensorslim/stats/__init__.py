"""Streaming calibration statistics (computed once per layer, shared by methods)."""

from .accumulators import ACCUMULATORS, AbsMaxAccumulator, Accumulator, GramAccumulator, NormAccumulator, Stat
from .layer import LayerStats, new_accumulators, stats_from_accumulators

__all__ = [
    "ACCUMULATORS",
    "AbsMaxAccumulator",
    "Accumulator",
    "GramAccumulator",
    "LayerStats",
    "NormAccumulator",
    "Stat",
    "new_accumulators",
    "stats_from_accumulators",
]
