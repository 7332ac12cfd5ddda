"""Compression methods: pure functions from a dense weight (and statistics) to a compressed weight."""

from .base import Compensator, Method
from .registry import build_method, known_methods, register_method
from .rtn import RTN

__all__ = ["RTN", "Compensator", "Method", "build_method", "known_methods", "register_method"]
