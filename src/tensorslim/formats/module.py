"""``CompressedLinear``: the module swapped in for an ``nn.Linear`` whose weight was compressed.

A plain module swap, not a tensor subclass: it holds one compressed weight and the (dense) bias. Moving the module
moves the stored tensors but never changes their dtypes, so the bytes a report counts are the bytes that run.

On a GPU the kernels read their own repack of the codes (:mod:`tensorslim.kernels.dispatch`), built on the first
call, so the GPU then holds the stored codes *and* the repack. :meth:`CompressedLinear.prepare_kernels` keeps only
the repack there: the stored weight moves to host memory (``save``, ``decode`` and other activation dtypes still use
it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .base import CompressedWeight

log = logging.getLogger(__name__)


class CompressedLinear(nn.Module):
    def __init__(self, weight: CompressedWeight, bias: torch.Tensor | None = None, *, method: str | None = None) -> None:
        super().__init__()
        self.compressed = weight
        self.out_features, self.in_features = weight.shape
        self.method = method
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._kernel: tuple | None = None  # (runtime layout, low-rank term or None, its "wa" repack) once prepared

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: CompressedWeight, *, method: str | None = None) -> "CompressedLinear":
        return cls(weight.to(linear.weight.device), linear.bias, method=method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_kernel", None) is not None:  # (modules pickled before session 11 have no such field)
            from ..kernels import dispatch

            lay, extra, wl = self._kernel
            if lay is None:  # float / binary-coded formats: their "wa" repack alone
                from ..kernels import dispatch_ext

                if dispatch.activation_reason(x) is None and x.device == wl.device:
                    return dispatch_ext.wa_layout_linear(wl, x, self.bias)
            elif dispatch.activation_reason(x) is None and x.device == wl.q.device:
                dispatch.keep_wa(lay, wl)  # (a deep copy or an unpickled module brings its own layout objects)
                return dispatch.layout_linear(lay, extra, x, self.bias)
            if not getattr(self, "_warned", False):
                log.warning("%s: prepare_kernels() left the stored weight in host memory; this %s %s call copies "
                            "it to %s each time (the kernels take float16/bfloat16 activations on the GPU)",
                            self.extra_repr(), x.dtype, tuple(x.shape), x.device)
                self._warned = True
            return self.compressed.to(x.device).linear(x, self.bias)
        return self.compressed.linear(x, self.bias)

    def prepare_kernels(self, host: torch.device | str = "cpu") -> bool:
        """Keep one copy of the codes on the GPU: build the kernels' repack now and move the stored weight to
        ``host`` (where ``save``, ``decode`` and the reference path use it; a call the kernels cannot take copies it
        back for that call, with a warning). Only where the "wa" kernel runs the weight: 2-4-bit integer groups and
        ternary whose blocks fit, alone or summed with a low-rank term (which stays on the GPU), 2:4 + int4 as
        its equal dense int4 weight, and MXFP4 / NVFP4 / BCQ whose "wa" repack fits and takes both bf16 and fp16
        (then "wa" runs every batch size, also where another path was faster: NVFP4's GEMV at 1 row, LUT-GEMM).
        Returns whether it did. Moving the module (``.to``, ``.cuda``, ``.half``) first
        brings the stored weight back and undoes this. The dispatcher's memos of the GPU weight go with it."""
        from ..kernels import dispatch

        if getattr(self, "_kernel", None) is not None:
            return True
        cw = self.compressed
        if dispatch.kernel_reason(cw, torch.empty(0, dtype=torch.bfloat16, device=cw.device)) is not None:
            return False
        found = dispatch.standalone_layout(cw)
        if found is not None:
            lay, extra = found
            self._kernel = (lay, extra, dispatch.wa_of(lay))
        else:  # float / binary-coded formats: their "wa" repack
            from ..kernels import dispatch_ext

            wl = dispatch_ext.standalone_wa(cw)
            if wl is None:
                return False
            self._kernel = (None, None, wl)
        self.compressed = cw.to(host)
        return True

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        # Follow device moves of the model; keep stored dtypes (a model.half() must not re-encode scales).
        if getattr(self, "_kernel", None) is not None:  # undo prepare_kernels(): stored weight back by the layout
            self.compressed = self.compressed.to(self._kernel[2].device)
            self._kernel = None
        self.compressed = _moved(self.compressed, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.compressed.format.spec()}, "
                f"bits_per_weight={self.compressed.bits_per_weight:.3f}"
                + (", prepared" if getattr(self, "_kernel", None) else ""))


def prepare_kernels(model: nn.Module, host: torch.device | str = "cpu") -> tuple[int, int]:
    """:meth:`CompressedLinear.prepare_kernels` on every ``CompressedLinear`` of ``model`` (already on its GPU):
    returns (modules prepared, ``CompressedLinear`` modules in all)."""
    mods = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    return sum(m.prepare_kernels(host) for m in mods), len(mods)


def _moved(cw: CompressedWeight, fn: Callable[[torch.Tensor], torch.Tensor]) -> CompressedWeight:
    import dataclasses

    changes = {}
    for f in dataclasses.fields(cw):
        v = getattr(cw, f.name)
        if isinstance(v, torch.Tensor):
            t = fn(v)  # a dtype change (model.half()) is not applied: only the device move, values untouched
            changes[f.name] = t if t.dtype == v.dtype else v.to(t.device)
        elif isinstance(v, CompressedWeight):
            changes[f.name] = _moved(v, fn)
    return dataclasses.replace(cw, **changes)
