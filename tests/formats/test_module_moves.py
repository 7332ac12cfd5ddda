"""``CompressedLinear`` follows device moves but never re-encodes what it stores: ``model.half()`` /
``.to(dtype)`` leave every stored tensor bit for bit (an fp32 NVFP4 global scale or BCQ alpha rounded through fp16
would change the weight; session 13 found the NVFP4 one)."""

from __future__ import annotations

import pytest
import torch

from tensorslim.formats import CompressedLinear, parse_format, quantize_rtn
from tensorslim.formats.bcq import quantize_bcq
from tensorslim.formats.mx import quantize_mx, quantize_nvfp4


def _weights(gen):
    w = torch.randn(24, 256, generator=gen) * 0.02
    return {
        "nvfp4": quantize_nvfp4(w, parse_format("nvfp4")),
        "mxfp4": quantize_mx(w, parse_format("mxfp4")),
        "bcq3:g64": quantize_bcq(w, parse_format("bcq3:g64"), rounds=2),
        "int4:g64": quantize_rtn(w, parse_format("int4:g64")),
    }


@pytest.mark.parametrize("move", ["half", "bfloat16", "double", "to_fp16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dtype_moves_keep_stored_tensors_exactly(move, seed):
    gen = torch.Generator().manual_seed(seed)
    for name, cw in _weights(gen).items():
        before = {k: v.clone() for k, v in cw.tensors().items()}
        lin = CompressedLinear(cw, torch.randn(24, generator=gen))
        lin = lin.to(torch.float16) if move == "to_fp16" else getattr(lin, move)()
        after = lin.compressed.tensors()
        assert sorted(after) == sorted(before), name
        for k, v in before.items():
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), (name, move, k)
        assert lin.bias.dtype != torch.float32  # the dense bias does follow the move
        assert torch.equal(lin.compressed.decode(), cw.decode()), name
