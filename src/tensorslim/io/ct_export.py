"""compressed-tensors export (the checkpoint format vLLM loads): integer groups, FP8 and NVFP4 layers.

Every representable layer is a byte copy of what we store into the tensors compressed-tensors' decompressor reads
(``pack-quantized`` for ``IntGroup``, ``float-quantized`` for FP8 E4M3, ``nvfp4-pack-quantized`` for NVFP4; the
mappings and their exactness argument are in :mod:`.ct_schemes`), so the package reproduces ``decode()`` exactly.

``quantization_config`` in config.json has one config group per distinct (compressed-tensors format, weights
scheme) with the exact layer names as targets and its own ``format``; the top-level ``format`` is that format when
all groups share it, else ``mixed-precision``. Every other linear is in ``ignore``. Layers that cannot be represented
(act-order, FP8 E5M2, other families: see :mod:`.ct_schemes`) are refused with the list of layers and reasons, or
written dense with ``dequantize_unsupported=True``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ExportError
from ..formats.module import CompressedLinear
from .atomic import atomic_folder
from .ct_schemes import ct_format, layer_tensors, reason, scheme_of, to_int32_words  # noqa: F401 (re-exported)
from .hf_export import dense_state_dict, write_hf_folder

logger = logging.getLogger(__name__)


def export_compressed_tensors(model: nn.Module, out: str | os.PathLike[str], *, tokenizer: Any = None,
                              dequantize_unsupported: bool = False) -> Path:
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ExportError(f"{type(model).__name__} is not a transformers model")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    bad = {n: r for n, m in layers.items() if (r := reason(m.compressed)) is not None}
    if bad and not dequantize_unsupported:
        raise ExportError("these layers cannot be represented in compressed-tensors: "
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
        key = json.dumps([ct_format(cw), scheme_of(cw)], sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme_of(cw), "input_activations": None,
                                "output_activations": None, "format": ct_format(cw)})["targets"].append(name)
    quantized = {n for n in layers if n not in bad}
    ignore = sorted(n for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, CompressedLinear)) and n not in quantized)
    formats = sorted({g["format"] for g in groups.values()})
    top = formats[0] if len(formats) == 1 else ("mixed-precision" if formats else "dense")
    qcfg = {"quant_method": "compressed-tensors", "format": top, "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}
    with atomic_folder(out) as tmp:
        write_hf_folder(model, tmp, sd, quantization_config=qcfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    logger.info("wrote compressed-tensors %s (%d layers, %d dense) to %s", top, len(quantized), len(ignore), out)
    return Path(out)
