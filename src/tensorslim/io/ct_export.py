"""compressed-tensors export (the checkpoint format vLLM loads): ``IntGroup`` layers as ``pack-quantized``.

compressed-tensors stores a ``b``-bit layer as ``weight_packed`` int32 ``[out, ceil(in*b/32)]`` (a dense little-endian
bit stream per row of the *unsigned* values ``x_q + 2^(b-1)``), ``weight_scale`` ``[out, n_groups]``,
``weight_zero_point`` (asymmetric only: int32, the unsigned zero points packed the same way along the *output*
dimension, ``[ceil(out*b/32), n_groups]``) and ``weight_shape``; it dequantizes ``(x_q - zp) * scale`` in the scale's
dtype. Our codes ``q`` and zero points ``z`` are already unsigned (``x_q = q - 2^(b-1)``, ``zp = z - 2^(b-1)``; a
symmetric format has ``z = 2^(b-1)``, i.e. ``zp = 0``), and our packing is the same little-endian bit stream, so the
export is a byte copy padded to whole int32 words: no requantization, and compressed-tensors' decompressor gives
``decode()`` exactly (in the scale dtype; both round the exact product ``(q - z) * s`` once).

``quantization_config`` in config.json has one config group per distinct (bits, group size, symmetry) with the
exact layer names as targets; every other linear is in ``ignore``. Not representable (refused with the list, or
written dense with ``dequantize_unsupported=True``): act-order layers (compressed-tensors' ``g_idx`` is not written
yet) and every non-integer format (FP8 / NVFP4 mappings are not implemented in this version).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..formats.intgroup import IntGroupWeight
from ..formats.module import CompressedLinear
from ..formats.packing import pack_codes
from .atomic import atomic_folder
from .hf_export import dense_state_dict, write_hf_folder

logger = logging.getLogger(__name__)


def to_int32_words(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Our packed uint8 rows -> compressed-tensors' int32 words (zero padded to ``ceil(n*bits/32)`` words)."""
    words = -(-n * bits // 32)
    pad = words * 4 - packed.shape[1]
    p = torch.nn.functional.pad(packed, (0, pad)) if pad else packed
    return p.contiguous().reshape(-1).view(torch.int32).reshape(packed.shape[0], words)  # little-endian host (x86, ARM)


def reason(cw: Any) -> str | None:
    if not isinstance(cw, IntGroupWeight):
        return f"format {cw.format.spec()} has no pack-quantized equivalent"
    if cw.format.act_order:
        return "act-order (g_idx) is not exported"
    return None


def scheme_of(cw: IntGroupWeight) -> dict[str, Any]:
    fmt = cw.format
    per_channel = fmt.group_size is None
    return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "dynamic": False,
            "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else fmt.group_size,
            "observer": "minmax", "actorder": None, "block_structure": None}


def layer_tensors(cw: IntGroupWeight) -> dict[str, torch.Tensor]:
    out, inp = cw.shape
    fmt = cw.format
    t = {"weight_packed": to_int32_words(cw.codes, inp, fmt.bits), "weight_scale": cw.scales.clone(),
         "weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    if not fmt.symmetric:
        _, _, zero = cw.unpacked()
        zt = pack_codes(zero.round().long().T.contiguous(), fmt.bits)  # [n_groups, bytes over out]
        t["weight_zero_point"] = to_int32_words(zt, out, fmt.bits).T.contiguous()
    return t


def export_compressed_tensors(model: nn.Module, out: str | os.PathLike[str], *, tokenizer: Any = None,
                              dequantize_unsupported: bool = False) -> Path:
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ExportError(f"{type(model).__name__} is not a transformers model")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    bad = {n: r for n, m in layers.items() if (r := reason(m.compressed)) is not None}
    if bad and not dequantize_unsupported:
        raise ExportError("these layers cannot be represented as compressed-tensors pack-quantized: "
                          + "; ".join(f"{n} ({r})" for n, r in bad.items())
                          + ". Pass dequantize_unsupported=True (CLI: --dequantize) to write them dense")
    sd = dense_state_dict(model)
    groups: dict[str, dict[str, Any]] = {}
    for name, mod in layers.items():
        if name in bad:
            continue
        cw = mod.compressed
        del sd[f"{name}.weight"]
        sd.update({f"{name}.{k}": v for k, v in layer_tensors(cw).items()})
        key = json.dumps(scheme_of(cw), sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme_of(cw), "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"})["targets"].append(name)
    quantized = {n for n in layers if n not in bad}
    ignore = sorted(n for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, CompressedLinear)) and n not in quantized)
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}
    with atomic_folder(out) as tmp:
        write_hf_folder(model, tmp, sd, quantization_config=qcfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    logger.info("wrote compressed-tensors pack-quantized (%d layers, %d dense) to %s", len(quantized), len(ignore), out)
    return Path(out)
