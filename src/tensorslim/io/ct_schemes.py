"""Per-format mappings of compressed weights to compressed-tensors layer tensors (used by :mod:`.ct_export`).

Each mapping is a byte copy of what we store (no requantization) into the tensors the compressed-tensors
decompressor reads, so the package reproduces our ``decode()`` exactly:

- ``IntGroup`` -> ``pack-quantized``: ``weight_packed`` int32 ``[out, ceil(in*b/32)]`` is our little-endian packed
  code stream of the unsigned codes ``q`` (the package's ``x_q + 2^(b-1)``) padded to whole words; ``weight_scale``
  ``[out, n_groups]`` in our scale dtype; asymmetric ``weight_zero_point`` (the unsigned zero points packed the same
  way along the output dimension); ``weight_shape``. Decompressed in the scale dtype: ``(x_q - zp) * s``, one rounding
  of the exact product, like ``decode(scale dtype)``.
- ``FP8`` (E4M3 only) -> ``float-quantized`` (weight-only, ``input_activations: null``): ``weight`` float8_e4m3fn
  ``[out, in]`` = our codes, ``weight_scale`` float32 ``[out, 1]`` (strategy ``channel``) or ``[out, in/g]``
  (strategy ``group``, ``group_size = g``); decompressed in float32 as ``float(c) * s`` = ``decode()``.
- ``NVFP4`` (block 16) -> ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[out, in/2]`` (E2M1 codes, low nibble
  first, the same 4-bit code table as ours), ``weight_scale`` float8_e4m3fn ``[out, in/16]`` (our ``s_b``) and
  ``weight_global_scale`` float32 ``[1]`` (our ``g``; both libraries use ``w = P * (s_b / g)``). The package's
  decompressor works in bfloat16 (its unpack dtype): it returns ``decode(torch.bfloat16)`` exactly, i.e. the fp32
  product ``P * (s_b / g)`` rounded once; in float32 the same tensors give ``decode()`` exactly.

Not representable, with the reason: act-order ``IntGroup`` (compressed-tensors 0.20 removed ``actorder="group"`` /
``g_idx``: its config validator rejects it and its decompressor ignores ``weight_g_idx``, so such a file would decode
wrongly), FP8 E5M2 (compressed-tensors' 8-bit float is E4M3 only), NVFP4 with another block size, and every other
family (MX, NF4, ternary, sparse, low-rank, sums, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.fp8 import FP8Weight
from ..formats.intgroup import IntGroupWeight
from ..formats.mx import NVFP4Weight
from ..formats.packing import pack_codes

# the keys every weights QuantizationArgs carries in our config.json (the package fills the rest with defaults)
_BASE = {"dynamic": False, "observer": "minmax", "actorder": None, "block_structure": None}


def to_int32_words(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Our packed uint8 rows -> compressed-tensors' int32 words (zero padded to ``ceil(n*bits/32)`` words)."""
    words = -(-n * bits // 32)
    pad = words * 4 - packed.shape[1]
    p = torch.nn.functional.pad(packed, (0, pad)) if pad else packed
    return p.contiguous().reshape(-1).view(torch.int32).reshape(packed.shape[0], words)  # little-endian host (x86, ARM)


def reason(cw: Any) -> str | None:
    """Why ``cw`` cannot be written as compressed-tensors (None when it can)."""
    if isinstance(cw, IntGroupWeight):
        if cw.format.act_order:
            return ("act-order needs compressed-tensors' g_idx (actorder='group'), which compressed-tensors 0.20 "
                    "removed (its decompressor ignores weight_g_idx); re-quantize without act-order")
        return None
    if isinstance(cw, FP8Weight):
        if cw.format.kind != "e4m3":
            return f"{cw.format.spec()}: compressed-tensors' 8-bit float is E4M3 only"
        return None
    if isinstance(cw, NVFP4Weight):
        if cw.format.block_size != 16:
            return f"{cw.format.spec()}: compressed-tensors' NVFP4 uses blocks of 16"
        return None
    return f"format {cw.format.spec()} has no compressed-tensors equivalent"


def ct_format(cw: Any) -> str:
    """The compressed-tensors format name of a representable layer."""
    if isinstance(cw, FP8Weight):
        return "float-quantized"
    if isinstance(cw, NVFP4Weight):
        return "nvfp4-pack-quantized"
    return "pack-quantized"


def scheme_of(cw: Any) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of a representable layer, as a JSON dict."""
    if isinstance(cw, IntGroupWeight):
        fmt = cw.format
        per_channel = fmt.group_size is None
        return {**_BASE, "num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
                "strategy": "channel" if per_channel else "group",
                "group_size": None if per_channel else fmt.group_size}
    if isinstance(cw, FP8Weight):
        g = cw.format.group_size
        return {**_BASE, "num_bits": 8, "type": "float", "symmetric": True,
                "strategy": "channel" if g is None else "group", "group_size": g}
    if isinstance(cw, NVFP4Weight):
        return {**_BASE, "num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                "group_size": 16, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}
    raise AssertionError(f"scheme_of called on an unsupported layer {type(cw).__name__}")


def layer_tensors(cw: Any) -> dict[str, torch.Tensor]:
    """The layer's compressed-tensors tensors (local names ``weight_*`` / ``weight``), copied from what we store."""
    out, inp = cw.shape
    if isinstance(cw, FP8Weight):
        return {"weight": cw.codes.clone(), "weight_scale": cw.scales.float().clone()}
    if isinstance(cw, NVFP4Weight):
        return {"weight_packed": cw.codes.clone(), "weight_scale": cw.scales.clone(),
                "weight_global_scale": cw.global_scale.float().reshape(1).clone()}
    fmt = cw.format
    t = {"weight_packed": to_int32_words(cw.codes, inp, fmt.bits), "weight_scale": cw.scales.clone(),
         "weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    if not fmt.symmetric:
        _, _, zero = cw.unpacked()
        zt = pack_codes(zero.round().long().T.contiguous(), fmt.bits)  # [n_groups, bytes over out]
        t["weight_zero_point"] = to_int32_words(zt, out, fmt.bits).T.contiguous()
    return t
