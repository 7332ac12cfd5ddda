"""Storage formats: specs with exact byte counts, compressed weights with a reference ``decode()``."""

from .base import CompressedWeight, Format, check_weight, weight_class
from .intgroup import IntGroup, IntGroupWeight, quantize_rtn
from .module import CompressedLinear
from .sum import Sum, SumWeight
from .registry import format_from_dict, known_formats, parse_format, register_format

__all__ = [
    "CompressedLinear",
    "CompressedWeight",
    "Format",
    "IntGroup",
    "IntGroupWeight",
    "check_weight",
    "format_from_dict",
    "known_formats",
    "parse_format",
    "quantize_rtn",
    "register_format",
    "Sum",
    "SumWeight",
    "weight_class",
]
