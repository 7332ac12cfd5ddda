"""Storage formats: specs with exact byte counts, compressed weights with a reference ``decode()``."""

from .base import CompressedWeight, Format, check_weight, weight_class
from .intgroup import IntGroup, IntGroupWeight, quantize_rtn
from .module import CompressedLinear, prepare_kernels
from .sum import Sum, SumWeight
from .registry import format_from_dict, known_formats, parse_format, register_format
from .lowrank import LowRank, LowRankWeight  # noqa: E402  (registers lowrank:)
from .kronecker import Kronecker, KroneckerWeight  # noqa: E402  (registers kron:)
from .monarch import Monarch, MonarchWeight  # noqa: E402  (registers monarch:)
from .fp8 import FP8, FP8Weight  # noqa: E402  (registers fp8:)
from .mx import MXFP, MXFPWeight, NVFP4, NVFP4Weight  # noqa: E402  (registers mxfp4/mxfp8/nvfp4)
from .nf4 import NF4, NF4Weight  # noqa: E402  (registers nf4:)
from .ternary import Ternary, TernaryWeight  # noqa: E402  (registers ternary)
from .bcq import BCQ, BCQWeight  # noqa: E402  (registers bcq<q>:)
from .bipolar import Bipolar, BipolarWeight  # noqa: E402  (registers bipolar<n>:)
from .sparse import GroupSparse, GroupSparseWeight, Sparse, SparseWeight  # noqa: E402  (registers sparse:, groupsparse:)
from .outliers import SparseOutliers, SparseOutliersWeight  # noqa: E402  (registers outliers:)
from .kquant import KQuant, KQuantWeight  # noqa: E402  (registers q4_k, q6_k)

__all__ = [
    "BCQ",
    "BCQWeight",
    "Bipolar",
    "BipolarWeight",
    "FP8",
    "FP8Weight",
    "MXFP",
    "MXFPWeight",
    "NF4",
    "NF4Weight",
    "NVFP4",
    "NVFP4Weight",
    "Ternary",
    "TernaryWeight",
    "CompressedLinear",
    "CompressedWeight",
    "Format",
    "IntGroup",
    "IntGroupWeight",
    "KQuant",
    "KQuantWeight",
    "Kronecker",
    "KroneckerWeight",
    "LowRank",
    "LowRankWeight",
    "Monarch",
    "MonarchWeight",
    "check_weight",
    "format_from_dict",
    "known_formats",
    "parse_format",
    "prepare_kernels",
    "quantize_rtn",
    "register_format",
    "GroupSparse",
    "GroupSparseWeight",
    "Sparse",
    "SparseWeight",
    "SparseOutliers",
    "SparseOutliersWeight",
    "Sum",
    "SumWeight",
    "weight_class",
]
