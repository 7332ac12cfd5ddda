"""Typed errors. Every user-facing failure raises a subclass of :class:`TensorslimError`.

Messages say what was wrong and how to fix it; callers may catch the narrow type.
"""

from __future__ import annotations


class TensorslimError(Exception):
    """Base class of every error tensorslim raises on purpose."""


class ConfigError(TensorslimError, ValueError):
    """A configuration value is invalid (names the field, the value and what is allowed)."""


class FormatError(ConfigError):
    """A format spec is unknown or cannot be parsed."""


class UnsupportedLayerError(TensorslimError, ValueError):
    """A layer's shape or type cannot take the requested format or method (names the layer and a fix)."""


class UnsupportedModelError(TensorslimError, ValueError):
    """The model architecture is not supported (lists what is)."""


class ModelSourceError(TensorslimError, OSError):
    """A model source is missing, corrupt, truncated, or an unknown alias."""


class CalibrationError(TensorslimError, ValueError):
    """Calibration data or statistics are unusable (too few tokens, non-finite activations, ...)."""


class NumericalError(TensorslimError, ArithmeticError):
    """A numerical routine met non-finite values or a singular system it cannot handle."""


class CheckpointError(TensorslimError, OSError):
    """A checkpoint is missing, corrupt, fails its checksum or its schema."""


class ExportError(TensorslimError, ValueError):
    """A model cannot be exported to the requested target (lists the layers that cannot be represented)."""


class KernelError(TensorslimError, RuntimeError):
    """A kernel is unavailable or failed on this device."""
