"""Calibration data and the block-by-block runner."""

from .data import calibration_data, sample_from_model, windows_from_tokens
from .runner import LayerResult, capture_block_inputs, run_compression

__all__ = ["LayerResult", "calibration_data", "capture_block_inputs", "run_compression", "sample_from_model", "windows_from_tokens"]
