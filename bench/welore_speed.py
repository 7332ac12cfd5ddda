"""Speed of the full WeLore + activation-whitened SVD pass over SmolLM2-135M (target: under 3 minutes, 2 CPU cores).

Times, separately: the rank allocation inside ``prepare_assign`` (WeLore: one ``svdvals`` per block linear + the
threshold bisection; with ``--spectra whitened`` also one dense-model Gram pass, float32), the per-layer solves
(whitening + one decomposition per compressed layer, summed from the runner's results) and the whole compression (allocation + the runner's calibration forwards and Gram
statistics + solves). Nothing is decomposed twice beyond WeLore's own ``svdvals``.
Prints a markdown table; writes JSON under runs/.

    python bench/welore_speed.py --reduction 0.3 --calib-samples 128 --calib-seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tensorslim.calib.data import calibration_data
from tensorslim.calib.fisher import prepare_assign
from tensorslim.calib.runner import run_compression
from tensorslim.formats import LowRank
from tensorslim.methods import build_method
from tensorslim.models import get_adapter, load_model

CALIB = "/work/shared/data/wikitext-2/valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reduction", type=float, default=0.3)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--method", default="welore-whitened", help="welore-whitened or svd-whitened-global")
    ap.add_argument("--spectra", default=None, choices=("weight", "whitened"),
                    help="welore-whitened: the spectra WeLore's rule reads (default: the method's, weight)")
    ap.add_argument("--calib-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the runner's calibration forwards / Gram products (bfloat16: see docs/results/lowrank.md)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="runs/welore_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    adapter = get_adapter(model)
    names = adapter.linear_names(model)
    calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=args.calib_seq, seed=0)
    method = build_method(args.method, LowRank(reduction=args.reduction),
                          **({"spectra": args.spectra} if args.spectra else {}))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    assign = prepare_assign(model, adapter, {n: method for n in names}, calib)  # the allocation (one svdvals each)
    t_alloc = time.perf_counter() - t0
    results = run_compression(model, adapter, assign, calib, progress=False, measure_error=False,
                              calib_dtype=args.calib_dtype)
    t_total = time.perf_counter() - t0
    t_solve = sum(r.seconds for r in results)
    row = {"method": args.method, "spectra": getattr(method, "spectra", None), "reduction": args.reduction, "linears": len(names), "compressed": len(results),
           "calib": f"{args.calib_samples}x{args.calib_seq}", "calib_dtype": args.calib_dtype, "threads": args.threads,
           "allocation_s": t_alloc, "solve_s": t_solve, "total_s": t_total, "machine": "2-core CPU (this dev machine)",
           "load_before": load_before, "load_after": os.getloadavg()[0], "under_3_min": t_total < 180}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=1))
    print("| pass | linears (compressed) | calibration | allocation s | whitened SVDs s | total s |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.method} lowrank:{args.reduction:g} | {len(names)} ({len(results)}) | {row['calib']} {args.calib_dtype} | "
          f"{t_alloc:.1f} | {t_solve:.1f} | {t_total:.1f} |")


if __name__ == "__main__":
    main()
