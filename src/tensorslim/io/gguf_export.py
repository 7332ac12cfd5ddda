"""GGUF export (llama.cpp) with exact re-encoding of integer group formats.

Mapping of an ``IntGroup`` layer (``w = (q - z) * s`` per group, ``s`` fp16) to llama.cpp's 32-weight blocks. A group
of ``g`` (a multiple of 32, or a per-channel row with ``in % 32 == 0``) becomes ``g / 32`` blocks sharing its scale,
so the blocks carry ``d = s``. With ``v = q - z``:
- ``Q4_0`` (``w = d * (c - 8)``, ``c`` in 0..15): exact when ``v`` always lies in [-8, 7]: symmetric formats of <= 4 bits.
- ``Q4_1`` / ``Q5_1`` (``w = d * c + m``): asymmetric 4 / 5 bits with ``c = q``, ``m = -z * s``; exact only when every
  ``z * s`` is an fp16 number (llama.cpp stores ``m`` in fp16; ``d * c + m`` is then computed exactly in fp32). This is
  checked per tensor; when it fails the next exact type is used.
- ``Q5_0`` (``w = d * (c - 16)``): ``v`` in [-16, 15]: symmetric 5 bits, and asymmetric <= 4 bits (``v`` in [-15, 15]).
- ``Q8_0`` (``w = d * c``, ``c`` int8): ``v`` in [-128, 127]: symmetric <= 8 bits and asymmetric <= 7 bits.
So every mapped layer dequantizes to *exactly* our ``decode()`` (in fp32); the price of exactness is one extra bit
per weight where an asymmetric 4-bit layer's ``m`` is not fp16 (Q5_0 instead of Q4_1). ``IntGroup`` is never mapped to a
k-quant (their 6-bit quantized sub-block scales cannot hold our fp16 scales exactly); instead the ``q4_k`` / ``q6_k``
formats (:mod:`tensorslim.formats.kquant`) store the GGML Q4_K / Q6_K blocks themselves and are written as a byte copy
(rows permuted like any Q/K tensor). Not representable (refused with the list of
layers, or written dense with ``dequantize_unsupported=True``): act-order layers, asymmetric 8-bit, scales that are not
fp16 numbers, groups that are not multiples of 32, and every other format family. Dense tensors are written F32
(exact) by default.

Architectures: llama (SmolLM, Llama), mistral (as llama, like llama.cpp), qwen2, qwen3. Q/K rows are permuted as
llama.cpp's converter does for llama; transformers' GGUF loader undoes it. The tokenizer (a BPE ``tokenizer.json``)
is written as ``tokenizer.ggml.model = gpt2`` with tokens, types and merges.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..formats.intgroup import IntGroup, IntGroupWeight
from ..formats.kquant import GGML_TYPE, KQuantWeight
from ..formats.module import CompressedLinear

logger = logging.getLogger(__name__)

_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


# ---------------------------------------------------------------------------------------------- block encoders


def _per_block(x: torch.Tensor, g: int) -> torch.Tensor:
    return x.repeat_interleave(g // 32, dim=1)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..15 -> [n, 16] bytes: element j low nibble, element j + 16 high nibble (ggml layout)."""
    return (c[:, :16] | (c[:, 16:] << 4)).astype(np.uint8)


def _high_bits(c: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..31 -> [n, 4] bytes: bit j of a little-endian uint32 = bit 4 of element j."""
    bits = ((c >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def choose_type(fmt: IntGroup, scale: torch.Tensor, zero: torch.Tensor, in_features: int, *,
                exact: bool = True) -> tuple[str | None, str]:
    """``(ggml type name or None, reason)`` for one IntGroup tensor (see the module note).

    ``exact=False`` maps asymmetric 4/5-bit layers to Q4_1/Q5_1 even when ``m = -z*s`` must be rounded to fp16
    (the llama.cpp-native types, each weight off by at most half an fp16 ulp of its group's ``m``)."""
    if fmt.act_order:
        return None, "act-order permutes the inputs; GGUF blocks are contiguous"
    g = fmt.group(in_features)
    if g % 32:
        return None, f"group {g} is not a multiple of 32 (the GGUF block size)"
    if not torch.equal(scale.to(torch.float16).float(), scale):
        return None, f"{fmt.scale_dtype} scales are not all fp16 numbers"
    b = fmt.bits
    if fmt.symmetric:
        for name, limit in (("Q4_0", 4), ("Q5_0", 5), ("Q8_0", 8)):
            if b <= limit:
                return name, "exact"
    m_exact = not exact or bool(torch.equal((zero * scale).to(torch.float16).float(), zero * scale))
    if b <= 4 and m_exact:
        return "Q4_1", "exact"
    if b <= 4:
        return "Q5_0", "exact (Q4_1 would round m = -z*s to fp16)"
    if b == 5 and m_exact:
        return "Q5_1", "exact"
    if b <= 7:
        return "Q8_0", "exact"
    return None, "asymmetric 8-bit codes minus zero points span [-255, 255], wider than Q8_0"


def encode_blocks(cw: IntGroupWeight, qtype: str, rows: torch.Tensor | None = None) -> np.ndarray:
    """The ggml bytes ``[out, in/32 * block_bytes]`` of ``cw`` in ``qtype`` (rows reordered by ``rows``)."""
    out, inp = cw.shape
    codes, scale, zero = cw.unpacked()
    g = cw.format.group(inp)
    s, z = _per_block(scale, g), _per_block(zero, g)
    if rows is not None:
        codes, s, z = codes[rows], s[rows], z[rows]
    nb = inp // 32
    q = codes.reshape(out * nb, 32).numpy().astype(np.int64)
    zz = z.reshape(out * nb, 1).numpy().astype(np.int64)
    d = _f16_bytes(s.reshape(-1).numpy())
    if qtype in ("Q4_1", "Q5_1"):
        m = _f16_bytes((-(z * s)).reshape(-1).numpy())
        parts = [d, m] + ([_nibbles(q)] if qtype == "Q4_1" else [_high_bits(q), _nibbles(q & 15)])
    else:
        v = q - zz
        if qtype == "Q4_0":
            parts = [d, _nibbles(v + 8)]
        elif qtype == "Q5_0":
            c = v + 16
            parts = [d, _high_bits(c), _nibbles(c & 15)]
        else:  # Q8_0
            parts = [d, v.astype(np.int8).view(np.uint8)]
    return np.concatenate(parts, axis=1).reshape(out, -1)


# ---------------------------------------------------------------------------------------------------- export


def _qk_rows(out: int, n_head: int) -> torch.Tensor:
    """llama.cpp's permute(w, n_head) as a row index: w_gguf = w[rows]."""
    hd = out // n_head
    return torch.arange(out).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def plan_export(model: nn.Module, *, exact: bool = True) -> tuple[dict[str, tuple[str | None, str]], list[str]]:
    """Per compressed layer ``(ggml type or None, reason)``, and the list of layers that cannot be represented."""
    plan: dict[str, tuple[str | None, str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, CompressedLinear):
            cw = mod.compressed
            if isinstance(cw, IntGroupWeight):
                _, scale, zero = cw.unpacked()
                plan[name] = choose_type(cw.format, scale, zero, cw.shape[1], exact=exact)
            elif isinstance(cw, KQuantWeight):
                plan[name] = (GGML_TYPE[cw.format.kind], "exact (the stored GGML blocks)")
            else:
                plan[name] = (None, f"format {cw.format.spec()} has no GGUF equivalent")
    bad = [f"{n} ({why})" for n, (t, why) in plan.items() if t is None]
    return plan, bad


def export_gguf(model: nn.Module, out: str | os.PathLike[str], *, tokenizer: Any = None,
                dequantize_unsupported: bool = False, dense_type: str = "F32", exact: bool = True) -> Path:
    """Write ``model`` as one GGUF file at ``out`` (atomically: temp file, then rename). See the module note."""
    import gguf

    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in _ARCH:
        raise ExportError(f"GGUF export supports model types {sorted(_ARCH)}, not {model_type!r}")
    arch = _ARCH[model_type]
    if dense_type not in ("F32", "F16"):
        raise ExportError(f"dense_type must be 'F32' or 'F16', got {dense_type!r}")
    plan, bad = plan_export(model, exact=exact)
    if bad and not dequantize_unsupported:
        raise ExportError("these layers cannot be represented in GGUF exactly: " + "; ".join(bad)
                          + ". Pass dequantize_unsupported=True (CLI: --dequantize) to write them dense")
    n_layer = cfg.num_hidden_layers
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)
    dense_q = getattr(gguf.GGMLQuantizationType, dense_type)
    np_dense = {"F32": np.float32, "F16": np.float16}[dense_type]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(getattr(cfg, "_name_or_path", "") or f"tensorslim-{model_type}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dense_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, cfg)

    tied = getattr(cfg, "tie_word_embeddings", False) and not isinstance(getattr(model, "lm_head", None), CompressedLinear)
    counts: dict[str, int] = {}

    def add(hf_name: str, array: np.ndarray, raw: Any = None) -> None:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of a {model_type} model")
        writer.add_tensor(gname, array, raw_dtype=raw)

    def rows_for(name: str, out_features: int) -> torch.Tensor | None:
        if arch != "llama":
            return None
        if name.endswith("q_proj"):
            return _qk_rows(out_features, n_head)
        if name.endswith("k_proj"):
            return _qk_rows(out_features, n_kv)
        return None

    compressed = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        layer = name.rsplit(".", 1)[0]
        arr = t.detach().float()
        rows = rows_for(layer, arr.shape[0]) if name.endswith((".weight", ".bias")) else None
        if rows is not None:
            arr = arr[rows]
        add(name, arr.numpy().astype(np.float32 if arr.ndim == 1 else np_dense), None if arr.ndim == 1 else dense_q)
    for layer, mod in compressed.items():
        cw = mod.compressed
        qtype, _ = plan[layer]
        rows = rows_for(layer, cw.shape[0])
        if qtype is None:
            w = cw.decode(torch.float32)
            w = w if rows is None else w[rows]
            add(f"{layer}.weight", w.numpy().astype(np_dense), dense_q)
            qtype = dense_type
        elif isinstance(cw, KQuantWeight):
            blocks = cw.blocks.cpu() if rows is None else cw.blocks.cpu()[rows]
            add(f"{layer}.weight", blocks.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
        else:
            add(f"{layer}.weight", encode_blocks(cw, qtype, rows), getattr(gguf.GGMLQuantizationType, qtype))  # type: ignore[arg-type]
        counts[qtype] = counts.get(qtype, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s: compressed layers by GGUF type %s", out, counts)
    return out


def _add_tokenizer(writer: Any, tokenizer: Any, cfg: Any) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer; pass tokenizer=None to omit it")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export writes BPE (gpt2-style) tokenizers only, not {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    specials = {}
    for a in spec.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        specials[a["id"]] = a.get("special", False)
    n = max(max(vocab.values()) + 1, cfg.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 3 if specials.get(i) else (4 if i in specials else 1)  # CONTROL / USER_DEFINED / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, fn in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                    ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        v = getattr(tokenizer, key, None)
        if isinstance(v, int):
            fn(v)


__all__ = ["choose_type", "encode_blocks", "export_gguf", "plan_export"]
