"""Pruning quality table on SmolLM2-135M: magnitude vs Wanda vs SparseGPT (50%, 2:4), joint 4-bit, GQSA group sparsity.

Each row compresses a fresh copy of the base model through the block-by-block runner (calibration from WikiText-2
valid), then perplexity, KL and top-1 agreement against the base model on the first ``--eval-tokens`` tokens of
wiki.test.raw (windows of 2048), bits per weight of the block linears and the compression time. Prints a markdown
table and writes JSON under runs/.

    python bench/sparsity_table.py --suite all --eval-tokens 32768
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from tensorslim.api import model_size
from tensorslim.calib.data import calibration_data
from tensorslim.calib.runner import run_compression
from tensorslim.eval.lm import evaluate_lm
from tensorslim.eval.text import read_text, tokenize_text
from tensorslim.formats import parse_format
from tensorslim.methods import build_method
from tensorslim.models import get_adapter, load_model

EVAL = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
CALIB = "/work/shared/data/wikitext-2/valid.txt"

SUITES: dict[str, list[tuple[str, str]]] = {
    "unstructured": [("magnitude", "sparse:0.5"), ("wanda", "sparse:0.5"), ("sparsegpt", "sparse:0.5")],
    "nm": [("magnitude", "sparse:2:4"), ("wanda", "sparse:2:4"), ("sparsegpt", "sparse:2:4")],
    "joint": [("wanda", "sparse:2:4+int4:g64"), ("sparsegpt", "sparse:2:4+int4:g64")],
    "gqsa": [("sparsegpt", "groupsparse:0.5+int4:g64"), ("sparsegpt", "groupsparse:0.25+int4:g64"),
             ("wanda", "groupsparse:0.5+int4:g64")],
}
SUITES["all"] = SUITES["unstructured"] + SUITES["nm"] + SUITES["joint"] + SUITES["gqsa"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="all", help=f"one of {sorted(SUITES)} or comma-separated")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--json", default="runs/sparsity_table.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_cfg = [c for s in args.suite.split(",") for c in SUITES[s]]
    base, tok = load_model("smollm2-135m")
    adapter = get_adapter(base)
    names = adapter.linear_names(base)
    eval_ids = tokenize_text(tok, read_text(EVAL), args.eval_tokens)
    calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=args.calib_seq, seed=0)
    base_eval = evaluate_lm(base, eval_ids)
    out = [{"label": "base (fp32)", "perplexity": base_eval.perplexity, "kl_mean": 0.0, "top1": 1.0,
            "bits_per_weight": 32.0, "compress_s": 0.0}]
    print(f"base ppl {base_eval.perplexity:.3f} on {eval_ids.numel()} tokens", flush=True)
    for method_name, spec in rows_cfg:
        model = copy.deepcopy(base)
        method = build_method(method_name, parse_format(spec))
        t0 = time.perf_counter()
        run_compression(model, adapter, {n: method for n in names}, calib, progress=False, measure_error=False)
        secs = time.perf_counter() - t0
        ev = evaluate_lm(model, eval_ids, baseline=base)
        row = {"label": f"{method_name} {spec}", "method": method_name, "format": spec,
               "perplexity": ev.perplexity, "kl_mean": ev.kl_mean, "top1": ev.top1_agreement,
               "bits_per_weight": model_size(model, adapter)[0], "compress_s": secs}
        out.append(row)
        print(json.dumps(row), flush=True)
        del model
    meta = {"eval_tokens": int(eval_ids.numel()), "calib_samples": args.calib_samples, "calib_seq": args.calib_seq,
            "machine": "2-core CPU (this dev machine)", "eval_text": EVAL, "calib_text": CALIB}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": out}, indent=1))
    print(f"\nSmolLM2-135M, {meta['eval_tokens']} eval tokens, calibration {args.calib_samples}x{args.calib_seq}\n")
    print("| method | ppl | KL | top-1 | bits/weight (linears) | compress s |")
    print("|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['label']} | {r['perplexity']:.2f} | {r['kl_mean']:.4f} | {r['top1']:.3f} | "
              f"{r['bits_per_weight']:.3f} | {r['compress_s']:.0f} |")


if __name__ == "__main__":
    main()
