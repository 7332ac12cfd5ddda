"""WINA vs TEAL activation sparsity on SmolLM2-135M: perplexity, KL, top-1 against the dense model, realized sparsity.

Every variant gets the same protocol: the same masks mode (``--mode topk``: exact per-token top-k; ``threshold``:
per-linear thresholds calibrated on WikiText-2 valid), the same allocation (``--allocation uniform`` or ``greedy``:
TEAL's per-matrix greedy, computed per variant with its own criterion on the same calibration text) and the same
dense prefix. The realized sparsity (fraction of block-linear multiply-adds skipped on the evaluation text) is
reported next to each row. Prints a markdown table; writes JSON.

Variants: teal (|x|); wina (|x| * own column norms, no rotation: the library default); wina-shared (one mask per
shared input, stacked column norms); wina-rot (SVD rotation of W_k / W_gate, norms on all linears); wina-release
(that rotation, norms on k/gate only: the released code); wina-stacked (SVD of [Wq;Wk;Wv] / [Wgate;Wup], shared
masks: the exact optimum of the group's summed output error).

    flock /tmp/ts-bench.lock python bench/wina_table.py --eval-tokens 32768 --allocation greedy
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from tensorslim.calib.data import calibration_data
from tensorslim.eval.lm import evaluate_lm
from tensorslim.eval.text import read_text, tokenize_text
from tensorslim.models import get_adapter, load_model
from tensorslim.runtime import apply_activation_sparsity, realized_sparsity, reset_counts
from tensorslim.runtime.act_alloc import error_curves, greedy_allocation

EVAL = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
CALIB = "/work/shared/data/wikitext-2/valid.txt"
VARIANTS = {
    "teal": {"kind": "teal"},
    "wina": {"kind": "wina"},
    "wina-shared": {"kind": "wina", "criterion": "shared"},
    "wina-rot": {"kind": "wina", "transform": "k-gate"},
    "wina-release": {"kind": "wina", "transform": "k-gate", "criterion": "kgate"},
    "wina-stacked": {"kind": "wina", "transform": "stacked", "criterion": "shared"},
}


def _baseline(base, cache_dir: str | None):
    if not cache_dir:
        return base
    from tensorslim.eval.cache import CachedBaseline

    return CachedBaseline(base, directory=cache_dir)  # from disk, one window in memory at a time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="0.25,0.4,0.5")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--variants", default="teal,wina", help=f"comma-separated from {sorted(VARIANTS)}")
    ap.add_argument("--mode", default="topk", choices=["topk", "threshold"])
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "greedy"])
    ap.add_argument("--dense-prefix", type=float, default=0.0)
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (thresholds, allocation)")
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--alloc-samples", type=int, default=8, help="of the calibration sequences, how many the "
                    "greedy allocation's error curves use")
    ap.add_argument("--grid", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--reference-cache", default=None, help="directory for the base model's logits (CachedBaseline)")
    ap.add_argument("--json", default="runs/wina_table.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [float(x) for x in args.levels.split(",")]
    grid = [float(g) for g in args.grid.split(",")]
    base, tok = load_model("smollm2-135m")
    eval_ids = tokenize_text(tok, read_text(EVAL), args.eval_tokens)
    calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=args.calib_seq, seed=0)
    baseline = _baseline(base, args.reference_cache)
    base_eval = evaluate_lm(base, eval_ids)
    out = [{"label": "dense", "perplexity": base_eval.perplexity, "kl_mean": 0.0, "top1": 1.0, "realized": 0.0}]
    print(f"base ppl {base_eval.perplexity:.3f}", flush=True)
    for variant in args.variants.split(","):
        opts = dict(VARIANTS[variant])
        common = {"mode": args.mode, "dense_prefix": args.dense_prefix}
        allocs: dict[float, dict[str, float]] = {}
        alloc_s = 0.0
        if args.allocation == "greedy":
            t0 = time.perf_counter()
            m = copy.deepcopy(base)
            apply_activation_sparsity(m, get_adapter(m), None, 0.0, **opts)
            curves = error_curves(m, get_adapter(m), calib[: args.alloc_samples], grid=grid)
            allocs = greedy_allocation(m, get_adapter(m), calib, levels, grid=grid, curves=curves)
            alloc_s = time.perf_counter() - t0
            del m
        for level in levels:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            apply_activation_sparsity(model, get_adapter(model), calib, level, **opts, **common,
                                      allocation=allocs.get(level, "uniform"))
            setup_s = time.perf_counter() - t0 + alloc_s
            reset_counts(model)
            ev = evaluate_lm(model, eval_ids, baseline=baseline)
            row = {"label": f"{variant} act:{level:g}", "variant": variant, "sparsity": level,
                   "realized": realized_sparsity(model), "perplexity": ev.perplexity, "kl_mean": ev.kl_mean,
                   "top1": ev.top1_agreement, "setup_s": setup_s, "eval_s": ev.seconds}
            if allocs:
                row["allocation"] = allocs[level]
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "allocation"}), flush=True)
            del model
    meta = {"eval_tokens": int(eval_ids.numel()), "machine": "2-core CPU dev machine (shared)", "mode": args.mode,
            "allocation": args.allocation, "dense_prefix": args.dense_prefix, "grid": grid,
            "calib": f"{args.calib_samples}x{args.calib_seq} WikiText-2 valid, seed 0", "threads": args.threads}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": out}, indent=1))
    print(f"\nSmolLM2-135M, {meta['eval_tokens']} eval tokens, {args.mode} masks, {args.allocation} allocation, "
          f"dense prefix {args.dense_prefix}\n")
    print("| method | target | realized | ppl | KL | top-1 |")
    print("|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['label']} | {r.get('sparsity', 0):.2f} | {r['realized']:.4f} | {r['perplexity']:.2f} | "
              f"{r['kl_mean']:.4f} | {r['top1']:.3f} |")


if __name__ == "__main__":
    main()
