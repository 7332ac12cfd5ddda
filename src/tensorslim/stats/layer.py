"""``LayerStats``: the finalized statistics one method call receives (immutable; absent ones are ``None``)."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import CalibrationError
from .accumulators import ACCUMULATORS, Accumulator, Stat


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerStats:
    n_tokens: int = 0
    gram: torch.Tensor | None = None  # sum x x^T  [in, in]
    norms: torch.Tensor | None = None  # sum x_i^2  [in]
    absmax: torch.Tensor | None = None  # max |x_i|  [in]
    fisher: torch.Tensor | None = None  # sum of squared loss gradients of W  [out, in]  (gradient pass)

    def require(self, stat: Stat | str, method: str, layer: str = "<layer>") -> torch.Tensor:
        v = getattr(self, str(stat))
        if v is None:
            raise CalibrationError(f"method {method!r} needs the {stat} statistic for layer {layer!r}; give calibration data")
        return v

    def hessian(self, method: str = "<method>", layer: str = "<layer>") -> torch.Tensor:
        """Mean second moment ``X^T X / N`` (float32). Damping is a fraction of its diagonal mean, so scale is moot."""
        g = self.require(Stat.GRAM, method, layer)
        return g / max(self.n_tokens, 1)

    def channel_norms(self, method: str = "<method>", layer: str = "<layer>") -> torch.Tensor:
        """``||X_{:,i}||_2`` per input channel (from NORMS, or the Gram diagonal when only that exists)."""
        if self.norms is not None:
            return self.norms.sqrt()
        if self.gram is not None:
            return self.gram.diagonal().clamp(min=0).sqrt()
        raise CalibrationError(f"method {method!r} needs input norms for layer {layer!r}; give calibration data")


def stats_from_accumulators(accs: dict[Stat, Accumulator]) -> LayerStats:
    counts = {a.count for a in accs.values()}
    return LayerStats(n_tokens=max(counts) if counts else 0, **{str(k): a.finalize() for k, a in accs.items()})


def new_accumulators(
    stats: set[Stat], dim: int, device: torch.device | str = "cpu", *, matmul_dtype: torch.dtype | None = None
) -> dict[Stat, Accumulator]:
    """One accumulator per statistic; ``matmul_dtype`` (bf16) speeds up the Gram product (see GramAccumulator)."""
    return {
        s: ACCUMULATORS[s](dim, device=device, **({"matmul_dtype": matmul_dtype} if s == Stat.GRAM else {}))
        for s in sorted(stats)
    }
