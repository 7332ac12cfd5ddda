"""Wall time and peak memory of compressing all 210 linear layers of SmolLM2-135M on this CPU.

    python bench/gptq_speed.py [--threads 2] [--samples 128 --seq-len 512] [--json runs/gptq_speed.json]

Times (each on a freshly loaded model): GPTQ int4:g64 *including calibration* (block-input capture, statistics,
solves, re-forwards: the whole ``ts.compress`` call), then RTN and HQQ-style (data-free). Peak resident memory is
VmHWM from /proc/self/status, reset right before each ``ts.compress`` call (so it is the peak *during*
compression, not the GGUF loader's); reported minus the RSS of the imported libraries (torch, transformers) and
relative to the model's float32 size. The process's lifetime peak (``ru_maxrss``) is printed too. Prints a
markdown table; writes JSON under runs/. Targets (issue 3): GPTQ < 120 s, RTN / HQQ < 30 s, peak RSS < 3x fp32 model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TS_DATA", ROOT.parent / "shared" / "data"))


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def status_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="int4:g64")
    ap.add_argument("--calib", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--calib-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="calibration forwards / Gram products (the CLI's --calib-dtype)")
    ap.add_argument("--methods", default="gptq,rtn,hqq")
    ap.add_argument("--json", default="runs/gptq_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tensorslim.api as ts
    from tensorslim.formats import parse_format
    from tensorslim.methods import build_method

    fmt = parse_format(args.format)
    import transformers  # noqa: F401  (count the libraries in the baseline, not in the runner's memory)

    libs_gib = status_gib("VmRSS")
    model, tok = ts.load_model(args.model)
    fp32_gib = sum(p.numel() for p in model.parameters()) * 4 / 2**30
    rss_loaded = rss_gib()
    t0 = time.perf_counter()
    data = ts.calibration_data(tok, args.calib, samples=args.samples, seq_len=args.seq_len, seed=0)
    t_tok = time.perf_counter() - t0
    rows = []
    for name in args.methods.split(","):
        if rows:
            model, _ = ts.load_model(args.model)
        method = build_method(name, fmt)
        opts = {"calib_dtype": args.calib_dtype} if method.requires else {}
        before = status_gib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        res = ts.compress(model, method, data if method.requires else None, progress=False, **opts)
        secs = time.perf_counter() - t0
        solve = sum(r.seconds for r in res.layers)
        rows.append({"method": name, "format": fmt.spec(), "layers": len(res.layers), "seconds": secs,
                     "solve_seconds": solve, "peak_rss_gib": rss_gib(), "rss_before_gib": before,
                     "peak_during_gib": status_gib("VmHWM")})
        print(json.dumps(rows[-1]), flush=True)
        del model
    print(f"\nSmolLM2-135M, {args.samples}x{args.seq_len} calibration tokens, torch threads {torch.get_num_threads()}, "
          f"calibration dtype {args.calib_dtype}, 2-core CPU (this dev machine); fp32 model {fp32_gib:.2f} GiB, "
          f"RSS with torch + transformers imported {libs_gib:.2f} GiB, after loading the model {rss_loaded:.2f} GiB "
          f"(lifetime peak incl. the GGUF loader's temporaries), tokenizing calibration text {t_tok:.1f} s\n")
    print("| method | format | layers | total s (incl. calibration) | solve s | RSS before | peak RSS during compress "
          "| (peak - libraries) / fp32 model | process lifetime peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['format']} | {r['layers']} | {r['seconds']:.1f} | {r['solve_seconds']:.1f} | "
              f"{r['rss_before_gib']:.2f} | {r['peak_during_gib']:.2f} | "
              f"{(r['peak_during_gib'] - libs_gib) / fp32_gib:.2f} | {r['peak_rss_gib']:.2f} |")
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "fp32_gib": fp32_gib, "rss_after_load_gib": rss_loaded, "libraries_gib": libs_gib,
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
