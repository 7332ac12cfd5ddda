"""Every integer method through the runner on a tiny random Llama (compress -> finite logits, bytes as counted)."""

import pytest
import torch

import tensorslim.api as ts
from tensorslim.formats import CompressedLinear, parse_format
from tensorslim.methods import build_method
from tensorslim.models.tiny import tiny_model


@pytest.mark.parametrize("name", ["rtn", "rtn-imatrix", "hqq", "gptq", "quantease", "quantease-outliers", "finequant"])
def test_method_through_runner(name):
    model = tiny_model("llama", seed=0)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (4, 32), generator=gen)
    ids = torch.randint(0, 128, (1, 32), generator=gen)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fmt = parse_format("int4:g16")
    opts = {"iters": 2} if name.startswith("quantease") else {}
    res = ts.compress(model, build_method(name, fmt, **opts), data, progress=False)
    mods = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert mods and len(res.layers) == len(mods)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() < 0.5 * before.abs().max()  # 4-bit keeps the function close
    for m in mods:
        cw = m.compressed
        assert cw.nbytes == cw.format.nbytes(cw.shape)
