"""k-quant formats (q4_k, q6_k): decode equals gguf's dequantizer bit for bit; GGUF export is a lossless byte copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tensorslim.errors import UnsupportedLayerError
from tensorslim.formats import CompressedLinear, KQuant, KQuantWeight, parse_format, quantize_rtn
from tensorslim.formats.kquant import quantize_kquant
from tensorslim.io import export
from tensorslim.io.gguf_export import _qk_rows, plan_export
from tensorslim.methods.registry import build_method
from tensorslim.stats import LayerStats

from .helpers import compress_linears, logits, wide_llama

gguf = pytest.importorskip("gguf")
KINDS = [("q4_k", "Q4_K", "int4:g64"), ("q6_k", "Q6_K", "int6:g32:sym")]


def _weights(out: int, inp: int) -> torch.Tensor:
    w = torch.randn(out, inp) * torch.rand(out, 1) * 0.05
    w[0] = 0  # an all-zero row: zero super-scales
    w[1, :256] = w[1, :256].abs()  # a super-block with no negative weights (min 0)
    w[2, 7] = 1.5  # an outlier
    return w


@pytest.mark.parametrize(("spec", "ggml", "rival"), KINDS)
def test_decode_equals_gguf_dequantize(spec: str, ggml: str, rival: str):
    fmt = parse_format(spec)
    assert isinstance(fmt, KQuant) and fmt.spec() == spec
    w = _weights(24, 768)
    cw = quantize_kquant(w, fmt)
    ref = gguf.quants.dequantize(cw.blocks.numpy(), getattr(gguf.GGMLQuantizationType, ggml))
    assert np.array_equal(ref, cw.decode().numpy())
    assert cw.nbytes == fmt.nbytes(w.shape) == 24 * 3 * {"q4_k": 144, "q6_k": 210}[spec]
    assert torch.equal(cw.decode()[0], torch.zeros(768))
    # the quantizer is at least as good as plain RTN at a similar size (q4_k: 4.5 bits vs int4:g64 4.31 bits;
    # q6_k: 6.56 bits vs int6:g32:sym 6.5 bits)
    err = (cw.decode() - w).norm()
    assert err < (quantize_rtn(w, parse_format(rival)).decode() - w).norm()


@pytest.mark.parametrize("spec", ["q4_k", "q6_k"])
def test_rtn_method_and_shape_refusal(spec: str):
    fmt = parse_format(spec)
    stats = LayerStats(n_tokens=0)
    cw = build_method("rtn", fmt).apply(torch.randn(8, 512), stats, layer="mlp.up_proj")
    assert isinstance(cw, KQuantWeight)
    assert KQuantWeight.from_tensors(fmt, cw.shape, cw.tensors()).decode().equal(cw.decode())
    assert "576" in fmt.supports((8, 576))
    with pytest.raises(UnsupportedLayerError, match="model.layers.0.mlp.up_proj"):
        build_method("rtn", fmt).apply(torch.randn(8, 576), stats, layer="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize(("spec", "ggml"), [("q4_k", "Q4_K"), ("q6_k", "Q6_K")])
def test_gguf_export_is_lossless(tmp_path: Path, spec: str, ggml: str):
    from transformers import AutoModelForCausalLM

    model = wide_llama(int(torch.randint(0, 2**31, ())))
    n = compress_linears(model, spec, seed=int(torch.randint(0, 2**31, ())))
    assert n == 14
    plan, bad = plan_export(model)
    assert not bad and {t for t, _ in plan.values()} == {ggml}
    path = export(model, "gguf", tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for i in range(2):
        for gname, mod, heads in ((f"blk.{i}.attn_k.weight", model.model.layers[i].self_attn.k_proj, 2),
                                  (f"blk.{i}.ffn_down.weight", model.model.layers[i].mlp.down_proj, None)):
            t = tensors[gname]
            assert t.tensor_type.name == ggml
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mod.out_features, mod.in_features)
            want = mod.compressed.decode()
            if heads:
                want = want[_qk_rows(mod.out_features, heads)]
            assert np.array_equal(got, want.numpy())
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.randint(3, 128, (2, 9))
    assert torch.equal(logits(back, x), logits(model, x))
    assert all(isinstance(m.mlp.up_proj, CompressedLinear) for m in model.model.layers)
