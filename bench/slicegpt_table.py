"""SliceGPT on SmolLM2-135M at 10/20/30% slicing: perplexity, KL, top-1, parameter count, CPU forward time.

The forward time is the median of ``--repeats`` timed forwards of one 2048-token sequence (fp32, no cache), dense and
sliced models interleaved so background load hits both alike. Prints a markdown table; writes JSON under runs/.

    python bench/slicegpt_table.py --eval-tokens 32768
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractions", default="0.1,0.2,0.3")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="runs/slicegpt_table.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model("smollm2-135m")
    eval_ids = tokenize_text(tok, read_text(EVAL), args.eval_tokens)
    calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=args.calib_seq, seed=0)
    timing_ids = eval_ids[:2048].unsqueeze(0) if eval_ids.numel() >= 2048 else eval_ids.unsqueeze(0)
    n_base = sum(p.numel() for p in base.parameters())
    base_eval = evaluate_lm(base, eval_ids)
    out = [{"label": "dense", "fraction": 0.0, "perplexity": base_eval.perplexity, "kl_mean": 0.0, "top1": 1.0,
            "params": n_base, "hidden": base.config.hidden_size}]
    print(f"base ppl {base_eval.perplexity:.3f} on {eval_ids.numel()} tokens, {n_base} params", flush=True)
    for frac in [float(f) for f in args.fractions.split(",")]:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        apply_slicegpt(model, get_adapter(model), calib, frac)
        secs = time.perf_counter() - t0
        ev = evaluate_lm(model, eval_ids, baseline=base)
        forward_seconds(model, timing_ids), forward_seconds(base, timing_ids)  # warm up
        ts, tb = [], []
        for _ in range(args.repeats):
            tb.append(forward_seconds(base, timing_ids))
            ts.append(forward_seconds(model, timing_ids))
        row = {"label": f"slicegpt slice:{frac:g}", "fraction": frac, "perplexity": ev.perplexity, "kl_mean": ev.kl_mean,
               "top1": ev.top1_agreement, "params": sum(p.numel() for p in model.parameters()),
               "hidden": model.config.hidden_size, "transform_s": secs, "forward_s": statistics.median(ts),
               "dense_forward_s": statistics.median(tb), "timing_tokens": int(timing_ids.numel())}
        out.append(row)
        print(json.dumps(row), flush=True)
        del model
    meta = {"eval_tokens": int(eval_ids.numel()), "calib_samples": args.calib_samples, "calib_seq": args.calib_seq,
            "machine": "2-core CPU (this dev machine)", "threads": args.threads}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": out}, indent=1))
    print(f"\nSmolLM2-135M, {meta['eval_tokens']} eval tokens, calibration {args.calib_samples}x{args.calib_seq}\n")
    print("| model | hidden | params | ppl | KL | top-1 | forward s (2048 tok) | dense forward s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out:
        fs = r.get("forward_s")
        sp = f"{r['dense_forward_s'] / fs:.2f}x" if fs else ""
        print(f"| {r['label']} | {r['hidden']} | {r['params'] / 1e6:.1f}M | {r['perplexity']:.2f} | {r['kl_mean']:.4f} | "
              f"{r['top1']:.3f} | {fs or 0:.3f} | {r.get('dense_forward_s', 0):.3f} | {sp} |")


if __name__ == "__main__":
    main()
