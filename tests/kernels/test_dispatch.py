"""Dispatch: CPU keeps the reference path bit for bit; reasons name why a kernel does not run; imports stay lazy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tensorslim.formats import CompressedLinear, IntGroup, quantize_rtn
from tensorslim.formats.lowrank import LowRank, LowRankWeight
from tensorslim.kernels import dispatch, kernel_reason
from tensorslim.kernels.reference import reference_linear


def test_cpu_linear_is_the_reference_path(gen):
    w = quantize_rtn(torch.randn(24, 128, generator=gen), IntGroup(bits=4, group_size=32))
    x = torch.randn(5, 128, generator=gen)
    bias = torch.randn(24, generator=gen)
    want = torch.nn.functional.linear(x, w.decode(x.dtype), bias)
    assert torch.equal(w.linear(x, bias), want)
    assert torch.equal(reference_linear(w, x, bias), want)
    mod = CompressedLinear(w, bias)
    assert torch.equal(mod(x), want)


def test_kernel_reasons(gen):
    w4 = quantize_rtn(torch.randn(8, 64, generator=gen), IntGroup(bits=4, group_size=32))
    assert "dtype" in kernel_reason(w4, torch.randn(1, 64))  # fp32 activations take the reference path
    w7 = quantize_rtn(torch.randn(8, 64, generator=gen), IntGroup(bits=7, group_size=32))
    assert "7-bit" in kernel_reason(w7)
    lr = LowRankWeight.from_factors(LowRank(rank=2), torch.randn(8, 2), torch.randn(2, 64))
    assert "no kernel" in kernel_reason(lr)
    assert dispatch._int_part(w4) is w4 and dispatch._int_part(lr) is None


def test_tuner_times_cold_copies(gen):
    """The tuner rotates through copies of a layout (new storage, same values) until they exceed twice the L2 cache;
    a layer already over twice the L2 is timed alone."""
    lay = dispatch.layout(quantize_rtn(torch.randn(64, 256, generator=gen), IntGroup(bits=3, group_size=64)))
    nbytes = sum(t.numel() * t.element_size() for t in (lay.qa, lay.qb, lay.scales, lay.zeros))
    copies = dispatch._cold_copies(lay, l2_bytes=3 * nbytes)
    assert len(copies) == 6 and copies[0] is lay
    for c in copies[1:]:
        assert c.qa.data_ptr() != lay.qa.data_ptr() and c.qb.data_ptr() != lay.qb.data_ptr()
        assert torch.equal(c.qa, lay.qa) and torch.equal(c.scales, lay.scales) and torch.equal(c.zeros, lay.zeros)
        assert (c.n, c.k, c.bits, c.group, c.symmetric) == (lay.n, lay.k, lay.bits, lay.group, lay.symmetric)
    assert dispatch._cold_copies(lay, l2_bytes=nbytes // 4) == [lay]
    assert len(dispatch._cold_copies(lay, l2_bytes=100 * nbytes)) == 16  # capped


def test_tuner_buckets_are_powers_of_two():
    assert [dispatch._pow2(m) for m in (1, 2, 3, 7, 16, 33, 128)] == [1, 2, 4, 8, 16, 64, 128]


def test_importing_formats_and_kernels_loads_neither_triton_nor_transformers():
    code = ("import sys; import tensorslim.formats, tensorslim.kernels, tensorslim.kernels.dispatch; "
            "print('triton' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_self_checks_run(ops):
    """The dispatcher's one-time checks of the inline-PTX kernels (here: their interpreter form) pass."""
    from tensorslim.kernels import dispatch

    for path, bits in (("mma4", 4), ("wa", 4), ("wa", 2)):
        assert dispatch.kernel_verified(path, bits, torch.device("cpu"), torch.float16), (path, bits)


def test_warm_clocks_replays_until_the_time_is_spent(monkeypatch):
    import time

    now = [100.0]  # a fake clock that each replay advances by 10 ms: no dependence on the machine's load
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    calls = []

    def replay():
        calls.append(now[0])
        now[0] += 0.01

    dispatch.warm_clocks(replay, 0.05)
    assert calls == pytest.approx([100.0, 100.01, 100.02, 100.03, 100.04])  # the whole interval, none after it
    assert now[0] - 100.0 >= 0.05
    calls.clear()
    dispatch.warm_clocks(replay, 0.0)
    assert calls == []  # no warm-up asked: nothing replayed
