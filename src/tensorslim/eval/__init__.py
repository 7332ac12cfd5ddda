"""Evaluation: perplexity, KL divergence and top-1 agreement against a base model, layer error, reports.

The protocol every quality number of the project uses is written down in docs/evaluation.md.
"""

from __future__ import annotations

from .cache import CachedBaseline, model_fingerprint
from .lm import LMEval, evaluate_lm, layer_relative_error
from .report import SCHEMA, LayerReport, Report, mean_bits_per_weight, render
from .text import read_text, tokenize_text

__all__ = [
    "SCHEMA",
    "CachedBaseline",
    "LMEval",
    "LayerReport",
    "Report",
    "evaluate_lm",
    "layer_relative_error",
    "mean_bits_per_weight",
    "model_fingerprint",
    "read_text",
    "render",
    "tokenize_text",
]
