"""GGUF export: exact block re-encoding, read back by gguf's reader and transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tensorslim.errors import ExportError
from tensorslim.io import export
from tensorslim.io.gguf_export import _qk_rows, export_gguf, plan_export
from tensorslim.models.tiny import tiny_model

from .helpers import compress_linears, logits

gguf = pytest.importorskip("gguf")


def _reimport(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize(("spec", "qtype"), [
    ("int4:g32:sym", "Q4_0"), ("int4:g64", "Q5_0"), ("int5:g32:sym", "Q5_0"), ("int8:pc:sym", "Q8_0"),
    ("int3:g32", "Q5_0"), ("int6:g64", "Q8_0"), ("int2:g32:sym", "Q4_0"),
])
def test_exact_export_reimports_bit_identical(tmp_path: Path, spec: str, qtype: str):
    model = tiny_model("llama", seed=4)
    compress_linears(model, spec)
    plan, bad = plan_export(model)
    assert not bad and {t for t, _ in plan.values()} == {qtype}
    path = export(model, "gguf", tmp_path / "m.gguf")
    # gguf's own reader and dequantizer give back our decode() exactly (q/k rows in llama.cpp's order)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    cl = model.model.layers[1].self_attn.q_proj
    t = tensors["blk.1.attn_q.weight"]
    assert t.tensor_type.name == qtype
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(cl.out_features, cl.in_features)
    want = cl.compressed.decode()[_qk_rows(cl.out_features, model.config.num_attention_heads)]
    assert np.array_equal(got, want.numpy())
    d = model.model.layers[0].mlp.down_proj.compressed
    t = tensors["blk.0.ffn_down.weight"]
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(d.shape), d.decode().numpy())
    x = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(_reimport(path), x), logits(model, x))


def test_asymmetric_q4_1_when_requested_is_within_fp16_rounding(tmp_path: Path):
    model = tiny_model("llama", seed=5)
    compress_linears(model, "int4:g32")
    out = export_gguf(model, tmp_path / "m.gguf", exact=False)
    t = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.0.ffn_up.weight"]
    assert t.tensor_type.name == "Q4_1"
    cw = model.model.layers[0].mlp.up_proj.compressed
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(cw.shape))
    _, scale, zero = cw.unpacked()
    m = (zero * scale).repeat_interleave(32, 1)
    ulp = torch.finfo(torch.float16).eps * m.abs()  # one fp16 ulp bound of |m| (half-ulp rounding, plus sum rounding)
    assert ((got - cw.decode()).abs() <= ulp + 1e-7).all()


def test_unsupported_layers_are_listed_or_dequantized(tmp_path: Path):
    model = tiny_model("llama", seed=6)
    compress_linears(model, "nf4:g32", under="model.layers.0.mlp")
    compress_linears(model, "int4:g32:act", under="model.layers.1.self_attn")
    compress_linears(model, "int4:g32:sym")
    with pytest.raises(ExportError) as e:
        export(model, "gguf", tmp_path / "m.gguf")
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and "model.layers.1.self_attn.q_proj" in msg and "act-order" in msg
    assert "model.layers.1.mlp.up_proj" not in msg
    assert not (tmp_path / "m.gguf").exists()
    path = export(model, "gguf", tmp_path / "m.gguf", dequantize_unsupported=True)
    x = torch.randint(3, 128, (1, 9))
    torch.testing.assert_close(logits(_reimport(path), x), logits(model, x), rtol=0, atol=1e-5)


def test_qwen2_with_biases(tmp_path: Path):
    model = tiny_model("qwen2", seed=7)
    compress_linears(model, "int8:pc:sym")
    path = export(model, "gguf", tmp_path / "q.gguf")
    x = torch.randint(3, 128, (1, 11))
    assert torch.equal(logits(_reimport(path), x), logits(model, x))


def test_refuses_unsupported_architecture(tmp_path: Path):
    with pytest.raises(ExportError, match="model types"):
        export(tiny_model("bert"), "gguf", tmp_path / "b.gguf")
