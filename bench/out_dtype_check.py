"""Check the "wa" kernel's outputs in the activation dtype (what a model gets), not only in fp32: every "wa" candidate
of the dispatcher, at several batch sizes, into NaN-poisoned bf16 / fp16 / fp32 outputs, repeated, against ``x @
decode()^T`` in fp32.

    python bench/out_dtype_check.py --jobs 15

An fp32 output differs from the reference by accumulation order only (<= 1e-3 relative); a 16-bit output adds one
rounding (~1e-3 relative for bf16), so the bound there is 4e-3. Split-K candidates run as ``ops.wa_mm`` runs them
(serial reduction in the per-stream workspace when ``SPLIT_K > 1``). Writes ``$OUT/out_dtype_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, "src")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

BOUND = {torch.float32: 1e-3, torch.bfloat16: 4e-3, torch.float16: 4e-3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--rows", default="1,7,16,64,128")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--x-dtypes", default="bfloat16", help="activation dtypes (float16 compiles its own kernels)")
    args = ap.parse_args()
    from kernels import make_int, prewarm
    from tensorslim.kernels import dispatch, ops
    from tensorslim.kernels.reference import reference_fp32, relative_error

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(m) for m in args.rows.split(",")]
    if args.jobs:
        prewarm([(k, n, "int4:g128", rows) for k, n in shapes], args.jobs)
    records, fails = [], 0
    for k, n in shapes:
        _, cw = make_int(k, n, "int4:g128")
        lay = dispatch.layout(cw)
        wl = dispatch.wa_of(lay)
        for m in rows:
            cands = [c for c in dispatch.candidates(lay, dispatch._pow2(m)) if c[0] == "wa"]
            for xdt in [getattr(torch, d) for d in args.x_dtypes.split(",")]:
                xs = [torch.randn(m, k, device="cuda", dtype=xdt) for _ in range(args.reps)]
                refs = [reference_fp32(cw, x) for x in xs]
                for _, cfg in cands:
                    for odt in (torch.float32, xdt):
                        worst = 0.0
                        for x, ref in zip(xs, refs):
                            y = ops.wa_mm(x, wl.q, wl.scales, wl.zeros, None, None, dispatch.wa_meta(wl), list(cfg),
                                          odt)
                            worst = max(worst, relative_error(y.float(), ref))
                        ok = worst <= BOUND[odt]
                        fails += not ok
                        records.append({"shape": f"{k}x{n}", "m": m, "x": str(xdt), "out": str(odt),
                                        "config": list(cfg), "rel_err": worst, "ok": ok})
                        if not ok:
                            print(f"FAIL {k}x{n} m={m} x={xdt} out={odt} {cfg}: rel err {worst:.2e}", flush=True)
        print(f"{k}x{n}: {sum(r['shape'] == f'{k}x{n}' for r in records)} checks", flush=True)
    print(f"{len(records)} checks, {fails} over the bound", flush=True)
    path = os.path.join(os.environ.get("OUT") or "runs", "out_dtype_check.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
