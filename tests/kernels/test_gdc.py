"""Grid dependency control: with a Triton that lacks it (< 3.3) the stand-ins compile and do nothing, and no
programmatic dependent launch is ever requested."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

_gdc = None  # the module as imported without Triton's grid dependency control (set by the test)


def _kernel():
    @triton.jit
    def k(x_ptr, PDL: tl.constexpr):
        if PDL:
            _gdc.gdc_launch_dependents()
            _gdc.gdc_wait()
        tl.store(x_ptr, tl.load(x_ptr) + 1.0)

    return k


def test_gdc_stand_ins_without_triton_support(ops, monkeypatch):
    global _gdc
    import tensorslim.kernels.triton.gdc as gdc

    monkeypatch.setitem(sys.modules, "triton.language.extra.cuda", types.ModuleType("triton.language.extra.cuda"))
    _gdc = importlib.reload(gdc)
    try:
        assert not _gdc.HAS_GDC
        x = torch.zeros(1)
        _kernel()[(1,)](x, PDL=True)
        assert x.item() == 1.0
    finally:
        monkeypatch.undo()
        has = hasattr(importlib.import_module("triton.language.extra.cuda"), "gdc_wait")
        assert importlib.reload(gdc).HAS_GDC == has
    assert not ops.pdl_ok(torch.zeros(1))
