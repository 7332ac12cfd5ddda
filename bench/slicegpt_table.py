"""SliceGPT on SmolLM2-135M: perplexity, KL, top-1, parameter count, CPU forward time of sliced vs dense.

``--bases global`` (one PCA basis, no shortcut matrices, tied head kept: the library default) and/or ``block``
(sequential per-boundary bases with shortcut matrices, the paper's layout) at the fractions given
(``--fractions`` for global, ``--block-fractions`` for block; 0.2/0.29/0.375 give block models no larger than global
at 0.1/0.2/0.3). The forward time is the median of ``--repeats`` timed forwards of one 2048-token sequence (fp32, no
cache), dense and sliced interleaved so background load hits both alike. Prints a markdown table; writes JSON.

    flock /tmp/ts-bench.lock python bench/slicegpt_table.py --eval-tokens 32768 --calib-samples 128
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from tensorslim.calib.data import calibration_data
from tensorslim.eval.lm import evaluate_lm
from tensorslim.eval.text import read_text, tokenize_text
from tensorslim.models import get_adapter, load_model
from tensorslim.transforms.slicegpt import apply_slicegpt

EVAL = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
CALIB = "/work/shared/data/wikitext-2/valid.txt"


@torch.inference_mode()
def forward_seconds(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t0


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once


def _baseline(base, cache_dir: str | None):
    if not cache_dir:
        return base
    from tensorslim.eval.cache import CachedBaseline

    return CachedBaseline(base, directory=cache_dir)  # from disk, one window in memory at a time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bases", default="global,block")
    ap.add_argument("--fractions", default="0.1,0.2,0.3", help="slicing fractions of the global basis")
    ap.add_argument("--block-fractions", default="0.2,0.29,0.375", help="slicing fractions of the block bases")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--timing-threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--untied", action="store_true", help="fold the final norm into an untied head (+vocab x d')")
    ap.add_argument("--reference-cache", default=None, help="directory for the base model's logits (CachedBaseline)")
    ap.add_argument("--json", default="runs/slicegpt_table.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model("smollm2-135m")
    eval_ids = tokenize_text(tok, read_text(EVAL), args.eval_tokens)
    calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=args.calib_seq, seed=0)
    timing_ids = tokenize_text(tok, read_text(EVAL), 2048).unsqueeze(0)
    baseline = _baseline(base, args.reference_cache)
    n_base = n_params(base)
    base_eval = evaluate_lm(base, eval_ids)
    out = [{"label": "dense", "basis": None, "fraction": 0.0, "perplexity": base_eval.perplexity, "kl_mean": 0.0,
            "top1": 1.0, "params": n_base, "hidden": base.config.hidden_size}]
    print(f"base ppl {base_eval.perplexity:.3f} on {eval_ids.numel()} tokens, {n_base} params", flush=True)
    runs = []
    for basis in args.bases.split(","):
        fr = args.fractions if basis == "global" else args.block_fractions
        runs += [(basis, float(f)) for f in fr.split(",") if f]
    for basis, frac in runs:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        apply_slicegpt(model, get_adapter(model), calib, frac, basis=basis, keep_tied=not args.untied)
        secs = time.perf_counter() - t0
        ev = evaluate_lm(model, eval_ids, baseline=baseline)
        row = {"label": f"slicegpt slice:{frac:g}:{basis}" + (" untied" if args.untied else ""), "basis": basis, "fraction": frac,
               "perplexity": ev.perplexity, "kl_mean": ev.kl_mean, "top1": ev.top1_agreement, "params": n_params(model),
               "hidden": model.config.hidden_size, "transform_s": secs,
               "tied_head": bool(model.lm_head.weight is model.model.embed_tokens.weight)}
        if not args.no_timing:
            torch.set_num_threads(args.timing_threads)
            forward_seconds(model, timing_ids), forward_seconds(base, timing_ids)  # warm up
            ts, tb = [], []
            for _ in range(args.repeats):
                tb.append(forward_seconds(base, timing_ids))
                ts.append(forward_seconds(model, timing_ids))
            torch.set_num_threads(args.threads)
            row.update(forward_s=statistics.median(ts), dense_forward_s=statistics.median(tb), forward_all=ts,
                       dense_forward_all=tb, timing_tokens=int(timing_ids.numel()))
        out.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
        del model
    meta = {"eval_tokens": int(eval_ids.numel()), "calib_samples": args.calib_samples, "calib_seq": args.calib_seq,
            "machine": "2-core CPU dev machine (shared)", "threads": args.threads,
            "timing_threads": args.timing_threads, "repeats": args.repeats}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": out}, indent=1))
    print(f"\nSmolLM2-135M, {meta['eval_tokens']} eval tokens, calibration {args.calib_samples}x{args.calib_seq}\n")
    print("| model | hidden | params | ppl | KL | top-1 | forward s (2048 tok) | dense forward s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out:
        fs = r.get("forward_s")
        sp = f"{r['dense_forward_s'] / fs:.2f}x" if fs else ""
        t = f"{fs:.3f} | {r['dense_forward_s']:.3f}" if fs else " | "
        print(f"| {r['label']} | {r['hidden']} | {r['params'] / 1e6:.2f}M | {r['perplexity']:.2f} | {r['kl_mean']:.4f} | "
              f"{r['top1']:.3f} | {t} | {sp} |")


if __name__ == "__main__":
    main()
