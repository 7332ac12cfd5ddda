"""compressed-tensors export: the package's own pack-quantized decompressor reproduces decode() exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tensorslim.errors import ExportError
from tensorslim.formats import CompressedLinear
from tensorslim.io import export
from tensorslim.models.tiny import tiny_model

from .helpers import compress_linears

ct = pytest.importorskip("compressed_tensors")


def _decompress_all(folder: Path) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(cfg)
    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(f))
    out = {}
    for group in qc.config_groups.values():
        for name in group.targets:
            local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight_")}
            out[name] = PackedQuantizationCompressor.decompress(local, group)["weight"]
    return out


@pytest.mark.parametrize("spec", ["int4:g32", "int4:g64:sym", "int3:g32", "int8:pc", "int2:g32:sym", "int5:g32"])
def test_decompressor_reproduces_decode(tmp_path: Path, spec: str):
    model = tiny_model("llama", seed=8)
    n = compress_linears(model, spec)
    path = export(model, "compressed-tensors", tmp_path / "ct")
    got = _decompress_all(path)
    layers = {k: m.compressed for k, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(got) == set(layers) and len(got) == n
    for name, cw in layers.items():
        want = cw.decode(cw.scales.dtype)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and "lm_head" in cfg["ignore"]


def test_unsupported_layers_listed(tmp_path: Path):
    model = tiny_model("qwen2", seed=9)
    compress_linears(model, "fp8:e4m3", under="model.layers.0.mlp")
    compress_linears(model, "int4:g32")
    with pytest.raises(ExportError, match="model.layers.0.mlp.up_proj"):
        export(model, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    path = export(model, "compressed-tensors", tmp_path / "ct", dequantize_unsupported=True)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in cfg["ignore"]
    got = _decompress_all(path)
    assert "model.layers.1.mlp.up_proj" in got and "model.layers.0.mlp.up_proj" not in got


def test_hf_export_is_dense_and_equivalent(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from .helpers import logits

    model = tiny_model("llama", seed=10)
    compress_linears(model, "int4:g32")
    path = export(model, "hf", tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    x = torch.randint(3, 128, (1, 10))
    assert torch.equal(logits(back, x), logits(model, x))
    assert any(isinstance(m, CompressedLinear) for m in model.modules())  # the input model is left compressed
