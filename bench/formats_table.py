"""Formats / rotations / activation and KV quantization / numerics on SmolLM2-135M (issue 8 acceptance table).

Usage: python bench/formats_table.py [--tokens 32768] [--only NAME ...] [--json runs/formats.json]

Protocol: wiki.test.raw (CRLF -> LF) tokenized whole, the first ``--tokens`` tokens, windows of 2048, fp32;
perplexity, KL(base || model) and top-1 agreement against the base model's cached log-probabilities. Weights of every
block linear are RTN-quantized directly (data-free; the head and embeddings stay dense). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from tensorslim.formats import CompressedLinear, parse_format
from tensorslim.eval.text import read_text, tokenize_text
from tensorslim.methods import build_method
from tensorslim.models.adapter import get_adapter
from tensorslim.models.sources import load_model
from tensorslim.runtime.actquant import apply_activation_quant
from tensorslim.runtime.kvcache import apply_kv_quant
from tensorslim.runtime.numerics import apply_numerics
from tensorslim.stats import LayerStats
from tensorslim.transforms.hadamard import apply_rotation

TEXT = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
WINDOW = 2048

# name -> (weight format or None, rotation or None, activation kind or None, kv kind or None, numerics or None)
CONFIGS: dict[str, tuple] = {
    "int4:g64": ("int4:g64", None, None, None, None),
    "int4:g64 +had": ("int4:g64", "hadamard", None, None, None),
    "mxfp4": ("mxfp4", None, None, None, None),
    "mxfp4 +had": ("mxfp4", "hadamard", None, None, None),
    "nvfp4": ("nvfp4", None, None, None, None),
    "nvfp4 +had": ("nvfp4", "hadamard", None, None, None),
    "nf4:g64": ("nf4:g64", None, None, None, None),
    "nf4:g64 +had": ("nf4:g64", "hadamard", None, None, None),
    "ternary:g64": ("ternary:g64", None, None, None, None),
    "ternary:g64 +had": ("ternary:g64", "hadamard", None, None, None),
    "W4A8 rtn": ("int4:g64", None, "int8", None, None),
    "W4A8 +had": ("int4:g64", "hadamard", "int8", None, None),
    "W4A4 rtn": ("int4:g64", None, "int4", None, None),
    "W4A4 +had": ("int4:g64", "hadamard", "int4", None, None),
    "KV int4": (None, None, None, "int4", None),
    "KV bfp4 plain": (None, None, None, "bfp4-plain", None),
    "KV bfp4 +ksort": (None, None, None, "bfp4", None),
    "fp8:e4m3": ("fp8:e4m3", None, None, None, None),
    "mxfp8": ("mxfp8", None, None, None, None),
    "bcq3:g64": ("bcq3:g64", None, None, None, None),
    "int3:g64": ("int3:g64", None, None, None, None),
    "lmul:m3": (None, None, None, None, "lmul:m3"),
}


def quantize_weights(model, adapter, spec: str) -> float:
    fmt = parse_format(spec)
    method = build_method("rtn", fmt)
    bits, n = 0.0, 0
    for name in adapter.linear_names(model):
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        cw = method.apply(lin.weight.detach().float(), LayerStats(), layer=name)
        setattr(model.get_submodule(parent), child, CompressedLinear.from_linear(lin, cw, method="rtn"))
        bits += cw.bits_per_weight * cw.numel
        n += cw.numel
    return bits / n


@torch.no_grad()
def logprobs(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for s in range(0, tokens.numel() - 1, WINDOW):
        ids = tokens[s:s + WINDOW].unsqueeze(0)
        out.append(torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1))
    return out


def score(lp: list[torch.Tensor], base: list[torch.Tensor], tokens: torch.Tensor) -> dict:
    nll, kl, top1, n = 0.0, 0.0, 0, 0
    for k, (a, b) in enumerate(zip(lp, base)):
        tgt = tokens[k * WINDOW + 1:k * WINDOW + a.shape[0]]
        a, b = a[:tgt.numel()], b[:tgt.numel()]
        nll += float(-a.gather(1, tgt[:, None]).sum())
        kl += float((b.exp() * (b - a)).sum())
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += tgt.numel()
    return {"ppl": math.exp(nll / n), "kl": kl / n, "top1": top1 / n, "tokens": n}


def build(base, name: str):
    wfmt, rot, act, kv, num = CONFIGS[name]
    model = copy.deepcopy(base)
    adapter = get_adapter(model)
    bpw = 16.0 * 0 + 32.0
    if rot:
        apply_rotation(model, adapter, rot, seed=0)
    if wfmt:
        bpw = quantize_weights(model, adapter, wfmt)
    if act:
        apply_activation_quant(model, adapter, act, clip=0.9 if act == "int4" else 1.0)
    if kv:
        apply_kv_quant(model, adapter, kv.replace("-plain", ""), reorder=False if kv.endswith("plain") else None)
    if num:
        apply_numerics(model, num, adapter)
    return model, bpw


@torch.no_grad()
def batch_invariance(base, tok_ids: torch.Tensor) -> dict:
    """Max |logit difference| of sequence 0 run alone vs in a batch of 8, for bf16 and LayerCast."""
    ids = tok_ids[: 8 * 256].reshape(8, 256)
    out = {}
    for kind in ("bf16", "layercast"):
        m = apply_numerics(copy.deepcopy(base), kind)
        one = m(input_ids=ids[:1], use_cache=False).logits.float()
        eight = m(input_ids=ids, use_cache=False).logits[:1].float()
        out[kind] = {"max_abs_diff": float((one - eight).abs().max()), "identical": bool(torch.equal(one, eight))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default="runs/formats.json")
    ap.add_argument("--no-invariance", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    base, tok = load_model("smollm2-135m")
    tokens = tokenize_text(tok, read_text(TEXT), max_tokens=args.tokens)
    t0 = time.time()
    base_lp = logprobs(base, tokens)
    results = {"base": {**score(base_lp, base_lp, tokens), "bpw": 32.0, "seconds": time.time() - t0}}
    print(f"base ppl {results['base']['ppl']:.3f} ({results['base']['seconds']:.0f} s)", flush=True)
    for name in args.only or list(CONFIGS):
        t0 = time.time()
        model, bpw = build(base, name)
        r = score(logprobs(model, tokens), base_lp, tokens)
        results[name] = {**r, "bpw": bpw, "seconds": time.time() - t0}
        print(f"{name}: ppl {r['ppl']:.3f} kl {r['kl']:.4f} top1 {r['top1']:.4f} bpw {bpw:.3f} "
              f"({results[name]['seconds']:.0f} s)", flush=True)
        del model
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.no_invariance:
        results["batch_invariance"] = batch_invariance(base, tokens)
        print("batch invariance:", results["batch_invariance"], flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n| config | weight bits/w | ppl | KL vs base | top-1 agreement |\n|---|---|---|---|---|")
    for name, r in results.items():
        if "ppl" in r:
            print(f"| {name} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} |")


if __name__ == "__main__":
    main()
