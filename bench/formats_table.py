"""Formats / rotations / FlatQuant / activation and KV quantization on SmolLM2-135M (issue 8 acceptance table).

    python bench/formats_table.py [--tokens 32768] [--only NAME ...] [--json runs/formats.json] [--threads 2]

Protocol: wiki.test.raw (CRLF -> LF) tokenized whole, the first ``--tokens`` tokens, windows of 2048, fp32;
perplexity, KL(base || model) and top-1 agreement against the base model. Every row runs in this one process: the
base model is loaded once, its logits are computed once per window and kept on disk (the lead's
:class:`~tensorslim.eval.CachedBaseline` folder ``--reference-cache``, shared with bench/quant_table.py; not kept in
memory: 16 x 403 MB), and every row is scored by :func:`~tensorslim.eval.evaluate_lm` (the standard protocol).
Weights of every block linear are RTN-quantized directly (data-free; the head and embeddings stay dense). FlatQuant rows fit their transforms on ``--calib-samples``
x ``--calib-len`` tokens of wikitext-2 valid (inputs captured once from the base model, shared by both rows).
Prints a markdown table; the JSON is rewritten after every row, and ``--resume`` skips rows already in it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from tensorslim.calib.data import calibration_data
from tensorslim.eval import CachedBaseline, evaluate_lm
from tensorslim.eval.text import read_text, tokenize_text
from tensorslim.formats import CompressedLinear, parse_format
from tensorslim.methods import build_method
from tensorslim.models.adapter import get_adapter
from tensorslim.models.sources import load_model
from tensorslim.runtime.actquant import apply_activation_quant
from tensorslim.runtime.kvcache import apply_kv_quant
from tensorslim.runtime.numerics import apply_numerics
from tensorslim.stats import LayerStats
from tensorslim.transforms.flatquant import FlatQuantConfig, apply_flatquant, capture_inputs
from tensorslim.transforms.hadamard import apply_rotation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
CALIB = DATA / "wikitext-2" / "valid.txt"
WINDOW = 2048

# name -> (weight format or None, transform or None, activation kind or None, kv kind or None, numerics or None)
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
    "W4A8 flatquant": ("int4:g64", "flatquant", "int8", None, None),
    "W4A4 rtn": ("int4:g64", None, "int4", None, None),
    "W4A4 +had": ("int4:g64", "hadamard", "int4", None, None),
    "W4A4 flatquant": ("int4:g64", "flatquant", "int4", None, None),
    "KV int4": (None, None, None, "int4", None),
    "KV bfp4 plain": (None, None, None, "bfp4-plain", None),
    "KV bfp4 +ksort": (None, None, None, "bfp4", None),
    # not in the default table (slow or not asked for): pass them with --only
    "fp8:e4m3": ("fp8:e4m3", None, None, None, None),
    "mxfp8": ("mxfp8", None, None, None, None),
    "bcq3:g64": ("bcq3:g64", None, None, None, None),
    "lmul:m3": (None, None, None, None, "lmul:m3"),
}
DEFAULT_ROWS = [n for n in CONFIGS if n not in ("fp8:e4m3", "mxfp8", "bcq3:g64", "lmul:m3")]


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


def score(model, tokens: torch.Tensor, reference) -> dict:  # noqa: ANN001
    """The standard protocol (:func:`tensorslim.eval.evaluate_lm`: windows of 2048, float32 log-softmax)."""
    r = evaluate_lm(model, tokens, baseline=reference, window=WINDOW)
    return {"ppl": r.perplexity, "kl": r.kl_mean, "kl_p99": r.kl_p99, "top1": r.top1_agreement,
            "tokens": r.tokens_evaluated}


def build(base, name: str, fq_inputs, fq_config: FlatQuantConfig) -> tuple[torch.nn.Module, float, dict]:
    wfmt, transform, act, kv, num = CONFIGS[name]
    model = copy.deepcopy(base)
    adapter = get_adapter(model)
    bpw, info = 32.0, {}
    clip = 0.9 if act == "int4" else 1.0
    if transform == "flatquant":
        cfg = FlatQuantConfig(**{**vars(fq_config), "act_bits": int(act[3:]), "act_clip": clip})
        t0 = time.time()
        losses = apply_flatquant(model, adapter, None, cfg, inputs=fq_inputs)
        info = {"flatquant_seconds": time.time() - t0, "layer_loss_start": sum(losses["start"]) / len(losses["start"]),
                "layer_loss_end": sum(losses["end"]) / len(losses["end"])}
    elif transform:
        apply_rotation(model, adapter, transform, seed=0)
    if wfmt:
        bpw = quantize_weights(model, adapter, wfmt)
    if act:
        apply_activation_quant(model, adapter, act, clip=clip)
    if kv:
        apply_kv_quant(model, adapter, kv.replace("-plain", ""), reorder=False if kv.endswith("plain") else None)
    if num:
        apply_numerics(model, num, adapter)
    return model, bpw, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default="runs/formats.json")
    ap.add_argument("--resume", action="store_true", help="skip rows already in --json")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reference-cache", default="runs/ref_smollm2_wiki32k",
                    help="folder of the base model's cached logits (shared with bench/quant_table.py)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--fq-steps", type=int, default=FlatQuantConfig.steps)
    ap.add_argument("--fq-tokens", type=int, default=FlatQuantConfig.tokens)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.json)
    results = json.loads(out.read_text()) if args.resume and out.exists() else {}
    base, tok = load_model("smollm2-135m")
    base.eval()
    tokens = tokenize_text(tok, read_text(str(TEXT)), max_tokens=args.tokens)
    t0 = time.time()
    reference = CachedBaseline(base, directory=args.reference_cache)  # from disk, one window in memory
    if "base" not in results:
        # the base row scores the cached logits themselves (no forward when the cache is warm)
        results["base"] = {**score(reference, tokens, reference), "bpw": 32.0, "seconds": time.time() - t0}
    print(f"base ppl {results['base']['ppl']:.3f} ({time.time() - t0:.0f} s; cached base windows read: "
          f"{reference.hits}, computed: {reference.misses})", flush=True)
    rows = [r for r in (args.only or DEFAULT_ROWS) if r not in results]
    fq_config = FlatQuantConfig(steps=args.fq_steps, tokens=args.fq_tokens)
    fq_inputs = None
    if any(CONFIGS[r][1] == "flatquant" for r in rows):
        t1 = time.time()
        data = calibration_data(tok, str(CALIB), samples=args.calib_samples, seq_len=args.calib_len, seed=0)
        fq_inputs = capture_inputs(base, get_adapter(base), data, tokens=fq_config.tokens, seed=fq_config.seed)
        print(f"FlatQuant inputs captured from {args.calib_samples} x {args.calib_len} tokens ({time.time() - t1:.0f} s)",
              flush=True)
    for name in rows:
        t1 = time.time()
        model, bpw, info = build(base, name, fq_inputs, fq_config)
        r = score(model, tokens, reference)
        results[name] = {**r, "bpw": bpw, "seconds": time.time() - t1, **info}
        print(f"{name}: ppl {r['ppl']:.3f} kl {r['kl']:.4f} top1 {r['top1']:.4f} bpw {bpw:.3f} "
              f"({results[name]['seconds']:.0f} s) {info or ''}", flush=True)
        del model
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "protocol": {"tokens": args.tokens, "window": WINDOW, "threads": args.threads,
                                                       "calib": f"{args.calib_samples}x{args.calib_len}",
                                                       "flatquant": vars(fq_config)}}, indent=1))
    print("\n| config | weight bits/w | ppl | KL vs base | KL p99 | top-1 agreement |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        if isinstance(r, dict) and "ppl" in r:
            print(f"| {name} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.4f} |")


if __name__ == "__main__":
    main()
