"""EoRA: training-free low-rank compensation of any compression error (Liu et al., arXiv 2410.21271).

After any method produced ``W_c`` (quantized, pruned, sliced), fit ``B A`` of rank ``r`` to the residual
``dW = W - W_c`` in the eigenspace of the layer's input second moment ``H = X^T X / N``:
``H = Q Lambda Q^T``, ``S = Q Lambda^{1/2}``, SVD ``dW S = U Sigma V^T``, ``B = U_r Sigma_r^{1/2}``,
``A = Sigma_r^{1/2} V_r^T S^{-1}``; this minimizes ``||(dW - B A) X^T||_F`` (the shared routine
:func:`.lowrank.weighted_lowrank`). ``dW`` is taken against the *original* ``W`` (not a solver's updated copy).

Result: ``Sum(base=<the method's format>, extra=LowRank(rank=r))`` (``int3:g64+lowrank:r32``); the multiply is the
base's own ``linear`` plus the side path ``(x A^T) B^T``. Stored: the base's tensors plus ``u = B``, ``v = A`` in the
LowRank dtype (float16 default): ``r (in + out)`` extra entries. CLI: ``--compensate eora:r32`` (see
:func:`parse_compensate`), optionally ``eora:r32:damp=0.01`` or ``eora:r32:float32``.
Limits: ``r <= min(out, in)``; without calibration data (no GRAM) it fails with :class:`CalibrationError`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.lowrank import FACTOR_DTYPES, LowRank, LowRankWeight
from ..formats.sum import Sum, SumWeight
from ..stats import LayerStats, Stat
from .base import Compensator
from .lowrank import truncation_rank_check, weighted_lowrank, whitening


@dataclasses.dataclass(frozen=True, kw_only=True)
class EoRA(Compensator):
    name: ClassVar[str] = "eora"
    requires: ClassVar[frozenset[Stat]] = frozenset({Stat.GRAM})
    rank: int
    damp: float = 0.0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"EoRA.rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.damp, (int, float)) or self.damp < 0:
            raise ConfigError(f"EoRA.damp must be a non-negative number, got {self.damp!r}")
        if self.dtype not in FACTOR_DTYPES:
            raise ConfigError(f"EoRA.dtype must be one of {sorted(FACTOR_DTYPES)}, got {self.dtype!r}")

    def apply(self, w: torch.Tensor, compressed: CompressedWeight, stats: LayerStats, *,
              layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        shape = (int(w.shape[0]), int(w.shape[1]))
        if tuple(compressed.shape) != shape:
            raise ConfigError(f"layer {layer!r}: compressed weight shape {compressed.shape} != weight shape {shape}")
        truncation_rank_check(shape, self.rank, layer)
        residual = w.float() - compressed.decode(torch.float32).to(w.device)
        wh = whitening(stats.hessian(self.name, layer), damp=float(self.damp), layer=layer)
        u, v = weighted_lowrank(residual, self.rank, whiten=wh, layer=layer)
        extra = LowRankWeight.from_factors(LowRank(rank=self.rank, dtype=self.dtype), u, v)
        out = SumWeight(format=Sum(base=compressed.format, extra=extra.format), shape=shape, base=compressed, extra=extra)
        out.validate()
        return out

    def describe(self) -> str:
        return f"eora r{self.rank}"

    def spec(self) -> str:
        s = f"eora:r{self.rank}"
        if self.damp:
            s += f":damp={self.damp:g}"
        return s if self.dtype == "float16" else f"{s}:{self.dtype}"


_SPEC = re.compile(r"^eora:r(\d+)((?::(?:damp=[0-9.eE+-]+|float16|bfloat16|float32))*)$")


def parse_compensate(spec: str) -> Compensator:
    """``"eora:r32"`` -> ``EoRA(rank=32)``; options ``:damp=<x>`` and ``:float32|:bfloat16``. ConfigError otherwise."""
    if not isinstance(spec, str):
        raise ConfigError(f"a compensate spec must be a string like 'eora:r32', got {spec!r}")
    m = _SPEC.match(spec.strip().lower())
    if not m:
        raise ConfigError(f"unknown compensate stage {spec!r}; expected eora:r<rank>[:damp=<x>][:float32], "
                          "e.g. eora:r32 (known stages: eora)")
    kwargs: dict[str, object] = {"rank": int(m.group(1))}
    for opt in (o for o in m.group(2).split(":") if o):
        if opt.startswith("damp="):
            try:
                kwargs["damp"] = float(opt[5:])
            except ValueError as e:
                raise ConfigError(f"compensate spec {spec!r}: bad damp value {opt[5:]!r}") from e
        else:
            kwargs["dtype"] = opt
    return EoRA(**kwargs)  # type: ignore[arg-type]
