"""compressed-tensors export: the package's own per-format decompressors reproduce decode() exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tensorslim.errors import ExportError
from tensorslim.formats import CompressedLinear
from tensorslim.formats.mx import NVFP4Weight
from tensorslim.io import export
from tensorslim.models.tiny import tiny_model

from .helpers import compress_linears

ct = pytest.importorskip("compressed_tensors")


def _decompress_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized layer through the compressor the package registers for its group's format."""
    from compressed_tensors.compressors import BaseCompressor
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
            local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight")}
            compressor = BaseCompressor.get_value_from_registry(getattr(group.format, "value", group.format))
            out[name] = compressor.decompress(local, group)["weight"]
    return out


def _want(cw) -> torch.Tensor:
    """Our decode in the dtype the package's decompressor returns: the scale dtype; bfloat16 for NVFP4 (its unpack
    dtype; the fp32 product rounded once)."""
    return cw.decode(torch.bfloat16 if isinstance(cw, NVFP4Weight) else cw.scales.dtype)


@pytest.mark.parametrize(("spec", "ct_format"), [
    ("int4:g32", "pack-quantized"), ("int4:g64:sym", "pack-quantized"), ("int3:g32", "pack-quantized"),
    ("int8:pc", "pack-quantized"), ("int2:g32:sym", "pack-quantized"), ("int5:g32", "pack-quantized"),
    ("fp8:e4m3", "float-quantized"), ("fp8:e4m3:g32", "float-quantized"), ("nvfp4", "nvfp4-pack-quantized"),
])
def test_decompressor_reproduces_decode(tmp_path: Path, spec: str, ct_format: str):
    model = tiny_model("llama", seed=int(torch.randint(0, 2**31, ())))
    n = compress_linears(model, spec, seed=int(torch.randint(0, 2**31, ())))
    path = export(model, "compressed-tensors", tmp_path / "ct")
    got = _decompress_all(path)
    layers = {k: m.compressed for k, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(got) == set(layers) and len(got) == n
    for name, cw in layers.items():
        want = _want(cw)
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == ct_format and "lm_head" in cfg["ignore"]


@pytest.mark.parametrize("spec", ["fp8:e5m2", "int4:g32:act", "mxfp4", "nvfp4:b32", "int4:g32+lowrank:r4"])
def test_unsupported_layers_listed(tmp_path: Path, spec: str):
    model = tiny_model("qwen2", seed=9)
    compress_linears(model, spec, under="model.layers.0.mlp")
    compress_linears(model, "int4:g32")
    with pytest.raises(ExportError, match="model.layers.0.mlp.up_proj") as err:
        export(model, "compressed-tensors", tmp_path / "ct")
    assert "model.layers.0.mlp.down_proj" in str(err.value) and "model.layers.1" not in str(err.value)
    assert not (tmp_path / "ct").exists()
    path = export(model, "compressed-tensors", tmp_path / "ct", dequantize_unsupported=True)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.up_proj" in cfg["ignore"]
    got = _decompress_all(path)
    assert "model.layers.1.mlp.up_proj" in got and "model.layers.0.mlp.up_proj" not in got


def test_mixed_formats_one_file(tmp_path: Path):
    model = tiny_model("llama", seed=int(torch.randint(0, 2**31, ())))
    compress_linears(model, "nvfp4", under="model.layers.0.self_attn")
    compress_linears(model, "fp8:e4m3:g16", under="model.layers.0.mlp")
    compress_linears(model, "int4:g32:sym", under="model.layers.1.self_attn")
    path = export(model, "compressed-tensors", tmp_path / "ct")
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "mixed-precision"
    assert {g["format"] for g in cfg["config_groups"].values()} == {
        "nvfp4-pack-quantized", "float-quantized", "pack-quantized"}
    assert "model.layers.1.mlp.up_proj" in cfg["ignore"]
    got = _decompress_all(path)
    layers = {k: m.compressed for k, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(got) == set(layers)
    for name, cw in layers.items():
        assert torch.equal(got[name], _want(cw)), name


def test_nvfp4_tensors_exact_in_float32(tmp_path: Path):
    """The stored NVFP4 numbers are exact: the package's own unpack + dequantize in fp32 give decode() bit for bit."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    model = tiny_model("llama", seed=int(torch.randint(0, 2**31, ())))
    compress_linears(model, "nvfp4")
    path = export(model, "compressed-tensors", tmp_path / "ct")
    sd = load_file(next(path.glob("*.safetensors")))
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    args = QuantizationArgs.model_validate(group["weights"])
    cw = model.model.layers[1].mlp.down_proj.compressed
    name = "model.layers.1.mlp.down_proj"
    p = unpack_fp4_from_uint8(sd[f"{name}.weight_packed"], *cw.shape, dtype=torch.float32)
    w = dequantize(p, sd[f"{name}.weight_scale"].float(), args=args, global_scale=sd[f"{name}.weight_global_scale"])
    assert torch.equal(w, cw.decode())


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


@pytest.mark.parametrize("spec", ["nvfp4", "fp8:e4m3", "int4:g32"])
def test_transformers_loader_dequantizes_to_decode(tmp_path: Path, spec: str):
    """transformers' compressed-tensors loader (dequantize=True) gives every layer's decode() exactly."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_model("llama", seed=int(torch.randint(0, 2**31, ())))
    compress_linears(model, spec)
    path = export(model, "compressed-tensors", tmp_path / "ct")
    back = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))
    sd = back.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            assert torch.equal(sd[f"{name}.weight"], _want(m.compressed).float()), name
