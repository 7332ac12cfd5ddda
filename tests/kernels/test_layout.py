"""The kernel layout (transposed word planes) reproduces decode() exactly; dispatch only builds valid launches."""

from __future__ import annotations

import pytest
import torch

from tensorslim.formats import IntGroup, quantize_rtn
from tensorslim.formats.ternary import Ternary, quantize_ternary
from tensorslim.kernels import dispatch
from tensorslim.kernels.layout import (check_config, int_layout, int_layout_reason, layout_decode, ternary_layout,
                                       unpack_plane)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group,sym", [(32, False), (128, True), (None, False), (64, True)])
def test_layout_decodes_exactly(bits, group, sym, gen):
    if sym and bits == 1:
        pytest.skip("1-bit symmetric is not a format")
    fmt = IntGroup(bits=bits, group_size=group, symmetric=sym)
    w = quantize_rtn(torch.randn(24, 256, generator=gen), fmt)
    lay = int_layout(w)
    assert torch.equal(layout_decode(lay), w.decode()), f"seed {gen.seed_}"
    assert lay.qa.dtype == torch.int32 and lay.qa.shape == (256 * lay.bits_a // 32, 24)
    assert (lay.qb is None) == (lay.bits_b == 0) and lay.bits_a + lay.bits_b == bits


def test_layout_act_order_keeps_stored_order(gen):
    fmt = IntGroup(bits=4, group_size=64, act_order=True)
    perm = torch.randperm(128, generator=gen)
    w = quantize_rtn(torch.randn(16, 128, generator=gen), fmt, perm)
    lay = int_layout(w)
    assert torch.equal(lay.perm, perm)
    # the kernel multiplies x[:, perm] by the stored columns; that equals x @ decode()^T
    x = torch.randn(3, 128, generator=gen, dtype=torch.float64)
    got = x[:, perm] @ layout_decode(lay).double().T
    torch.testing.assert_close(got, x @ w.decode().double().T)


def test_unpack_plane_is_little_endian_per_word():
    q = torch.tensor([[0x76543210]], dtype=torch.int32)  # one word, one column: codes 0..7 at 4 bits
    assert unpack_plane(q, 4, 8).tolist() == [list(range(8))]


@pytest.mark.parametrize("group", [None, 64])
def test_ternary_layout_decodes_exactly(group, gen):
    w = quantize_ternary(torch.randn(20, 192, generator=gen), Ternary(group_size=group))
    assert torch.equal(layout_decode(ternary_layout(w)), w.decode()), f"seed {gen.seed_}"


def test_layout_reasons():
    assert "7-bit" in int_layout_reason(quantize_rtn(torch.randn(4, 64), IntGroup(bits=7, group_size=32)))
    assert "multiple of 32" in int_layout_reason(quantize_rtn(torch.randn(4, 48), IntGroup(bits=4, group_size=16)))
    assert int_layout_reason(quantize_rtn(torch.randn(4, 576), IntGroup(bits=4, group_size=64))) is None


SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192), (1536, 576), (11008, 4096)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_every_candidate_is_a_valid_launch(n, k):
    """The tuner may pick any candidate, so every one must satisfy the kernels' invariants."""
    for bits, group in [(4, 128), (3, 128), (2, 64), (8, 32), (4, None)]:
        g = group if group is None or k % group == 0 else 64
        fmt = IntGroup(bits=bits, group_size=g)
        lay = int_layout(quantize_rtn(torch.zeros(1, k), fmt))  # layout shape checks only need k
        lay = dispatch.IntKernelLayout(**{**lay.__dict__, "n": n})
        meta = [lay.k, lay.bits, lay.bits_a, lay.bits_b, lay.group, int(lay.symmetric)]
        for m in (1, 2, 3, 7, 16, 33, 64, 128, 300):
            cands = dispatch.candidates(lay, dispatch._pow2(m))
            assert cands, (n, k, bits, m)
            assert m < 64 or ("dequant", ()) in cands
            for path, config in cands:
                if path != "dequant":
                    check_config(path, meta, list(config), m)
