"""Speed of the full WeLore + activation-whitened SVD pass over SmolLM2-135M (target: under 3 minutes, 2 CPU cores).

Times, separately: the data-free WeLore allocation (one svdvals per block linear + the threshold bisection), and the
whole compression (allocation + the runner's calibration forwards, Gram statistics and one whitened SVD per layer).
Prints a markdown table; writes JSON under runs/.

    python bench/welore_speed.py --reduction 0.3 --calib-samples 128 --calib-seq 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tensorslim.calib.data import calibration_data
from tensorslim.calib.fisher import prepare_assign
from tensorslim.calib.runner import run_compression
from tensorslim.formats import LowRank
from tensorslim.methods.welore import WeLoreWhitened, allocate_ranks, singular_values
from tensorslim.models import get_adapter, load_model

CALIB = "/work/shared/data/wikitext-2/valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reduction", type=float, default=0.3)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--json", default="runs/welore_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    adapter = get_adapter(model)
    names = adapter.linear_names(model)
    calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=args.calib_seq, seed=0)
    weights = {n: model.get_submodule(n).weight.detach().float() for n in names}
    t0 = time.perf_counter()
    sv = singular_values(weights)
    allocate_ranks(weights, args.reduction, "welore", spectra=sv)
    t_alloc = time.perf_counter() - t0
    t0 = time.perf_counter()
    method = WeLoreWhitened(format=LowRank(reduction=args.reduction))
    assign = prepare_assign(model, adapter, {n: method for n in names}, calib)
    run_compression(model, adapter, assign, calib, progress=False, measure_error=False)
    t_total = time.perf_counter() - t0
    row = {"reduction": args.reduction, "linears": len(names), "calib": f"{args.calib_samples}x{args.calib_seq}",
           "allocation_s": t_alloc, "total_s": t_total, "machine": "2-core CPU (this dev machine)",
           "under_3_min": t_total < 180}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(row, indent=1))
    print("| pass | linears | calibration | WeLore allocation s | total s (allocation + stats + whitened SVD) |")
    print("|---|---|---|---|---|")
    print(f"| welore-whitened lowrank:{args.reduction:g} | {len(names)} | {row['calib']} | {t_alloc:.1f} | {t_total:.1f} |")


if __name__ == "__main__":
    main()
