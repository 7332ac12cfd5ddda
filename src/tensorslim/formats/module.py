"""``CompressedLinear``: the module swapped in for an ``nn.Linear`` whose weight was compressed.

A plain module swap, not a tensor subclass: it holds one compressed weight and the (dense) bias. Moving the module
moves the stored tensors but never changes their dtypes, so the bytes a report counts are the bytes that run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import CompressedWeight


class CompressedLinear(nn.Module):
    def __init__(self, weight: CompressedWeight, bias: torch.Tensor | None = None, *, method: str | None = None) -> None:
        super().__init__()
        self.compressed = weight
        self.out_features, self.in_features = weight.shape
        self.method = method
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: CompressedWeight, *, method: str | None = None) -> "CompressedLinear":
        return cls(weight.to(linear.weight.device), linear.bias, method=method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compressed.linear(x, self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        # Follow device moves of the model; keep stored dtypes (a model.half() must not re-encode scales).
        self.compressed = _moved(self.compressed, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.compressed.format.spec()}, "
                f"bits_per_weight={self.compressed.bits_per_weight:.3f}")


def _moved(cw: CompressedWeight, fn: Callable[[torch.Tensor], torch.Tensor]) -> CompressedWeight:
    import dataclasses

    changes = {}
    for f in dataclasses.fields(cw):
        v = getattr(cw, f.name)
        if isinstance(v, torch.Tensor):
            t = fn(v)
            changes[f.name] = t if t.dtype == v.dtype else t.to(v.dtype)
        elif isinstance(v, CompressedWeight):
            changes[f.name] = _moved(v, fn)
    return dataclasses.replace(cw, **changes)
