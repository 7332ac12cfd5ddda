"""Weights-as-A variants for the float and binary-coded formats, one GPU call: what the next kernel changes need.

For each issue shape and 1, 16 and 64 rows, against cuBLAS bf16 in the same run:
- ``bcq3 J32`` / ``bcq3 J64``: BCQ3 g128 "wa" with blocks of 512 (the default) and of 1024 inputs (twice the MMA
  work between waits; built in session 13; `bench/prepared_ext.py` timed it on one shape in session 14);
- ``nvfp4 wa`` / ``mxfp4 wa``: "wa" alone, i.e. what a module runs after ``prepare_kernels()``
  (:func:`tensorslim.kernels.dispatch_ext.wa_layout_linear`, tuned among "wa" configs);
- ``<format> tuned``: the dispatcher's own choice among all paths (what an unprepared module runs).
Every variant is first checked against ``x @ decode()^T`` in fp32 (fp32 output into a NaN-poisoned buffer, and the
16-bit output at 4x the bound). Timing as ``bench/kernels.py``: CUDA-graph replays over weight copies that exceed
twice the L2 cache, median, after the clocks are up.

    python bench/wa_ext_variants.py              # on the GPU; writes $OUT/wa_ext_variants.json (or runs/)
    python bench/wa_ext_variants.py --quick      # 4096x14336 and 8192x28672 only
    TRITON_INTERPRET=1 python bench/wa_ext_variants.py --smoke   # CPU: the correctness part on a small shape
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
TOL = 1e-3


def make(spec: str, k: int, n: int, device: str):
    from tensorslim.formats import parse_format, quantize_rtn
    from tensorslim.formats.bcq import bcq_from_intgroup
    from tensorslim.formats.mx import quantize_mx, quantize_nvfp4

    torch.manual_seed(0)
    w = torch.randn(n, k, device=device) * 0.02
    if spec == "bcq3":  # as bench/kernels_new_formats.py: an int3 RTN weight as BCQ
        return bcq_from_intgroup(quantize_rtn(w, parse_format("int3:g128" if k % 128 == 0 else "int3:g64")))
    return quantize_nvfp4(w, parse_format(spec)) if spec == "nvfp4" else quantize_mx(w, parse_format(spec))


def variants(k: int, n: int, device: str) -> dict:
    """name -> (weight, its "wa" repack or None for the dispatcher's own choice)."""
    from tensorslim.kernels import dispatch_ext
    from tensorslim.kernels.layout_ext import bcq_wa_layout, bcq_wa_reason

    out = {}
    for spec in ("bcq3", "nvfp4", "mxfp4"):
        cw = make(spec, k, n, device)
        if spec == "bcq3":
            if bcq_wa_reason(cw) is not None:
                continue
            for j in (32, 64):
                if k % (16 * j) == 0:
                    out[f"bcq3 J{j}"] = (cw, bcq_wa_layout(cw, j))
        elif dispatch_ext.wa_ext_reason(cw) is None:
            out[f"{spec} wa"] = (cw, dispatch_ext.wa_ext(cw))
        out[f"{spec} tuned"] = (cw, None)
    return out


def check(cw, wl, x) -> float:
    """Worst relative error of the variant's tuned config (or the dispatcher's choice) against fp32."""
    from tensorslim.kernels import dispatch, dispatch_ext
    from tensorslim.kernels.reference import reference_fp32, relative_error

    ref = reference_fp32(cw, x)
    if wl is None:
        return relative_error(dispatch.kernel_linear(cw, x, out_dtype=torch.float32), ref)
    choice = _choice(wl, x)
    if choice[0] == "dequant":  # the repack decoded to bf16, then cuBLAS: bound 4e-3
        return relative_error(dispatch_ext.wa_layout_linear(wl, x, choice=choice, out_dtype=torch.float32), ref) / 4
    config = choice[1]
    out = torch.zeros(x.shape[0], wl.n, device=x.device) if config[2] > 1 else \
        torch.full((x.shape[0], wl.n), float("nan"), device=x.device)
    dispatch_ext.launch_wa_ext(wl, x, config, out)
    y16 = dispatch_ext.wa_ext_mm(wl, x, config, x.dtype)
    return max(relative_error(out, ref), relative_error(y16.float(), ref) / 4)


def _choice(wl, x):
    """The config ``wa_layout_linear`` settles on for ``x`` (it tunes on first use and remembers)."""
    from tensorslim.kernels import dispatch_ext

    return dispatch_ext.wa_choice(wl, x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter: correctness on 1024x64 only")
    args = ap.parse_args()
    if args.smoke:
        for name, (cw, wl) in variants(1024, 64, "cpu").items():
            x = torch.randn(3, 1024).to(torch.float16)
            err = check(cw, wl, x)
            print(f"{name}: rel err {err:.2e}")
            assert err <= TOL, name
        return
    from kernels import bench_graph, n_copies
    from tensorslim.kernels import dispatch, dispatch_ext

    dev = torch.cuda.get_device_name()
    print(f"wa variants: {dev}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    t0 = time.time()
    rows, fails = [], 0
    for k, n in ([SHAPES[0], SHAPES[2]] if args.quick else SHAPES):
        vs = variants(k, n, "cuda")
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        for m in (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{k}x{n}", "m": m,
                   "bf16_us": bench_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])}
            for name, (cw, wl) in vs.items():
                err = check(cw, wl, x)
                fails += not err <= TOL
                copies = n_copies(cw.nbytes)
                if wl is None:
                    cws = [dataclasses.replace(cw) for _ in range(copies)]  # own kernel layouts each
                    row[f"{name} path"] = dispatch_ext.runtime_choice(cws[0], x)
                    us = bench_graph([lambda c=c: dispatch.kernel_linear(c, x) for c in cws])
                else:
                    choice = _choice(wl, x)
                    wls = [wl] + [dataclasses.replace(wl, **{f.name: getattr(wl, f.name).clone()
                                                             for f in dataclasses.fields(wl)
                                                             if isinstance(getattr(wl, f.name), torch.Tensor)})
                                  for _ in range(copies - 1)]
                    row[f"{name} path"] = choice
                    us = bench_graph([lambda w=w: dispatch_ext.wa_layout_linear(w, x, choice=choice) for w in wls])
                row[f"{name} us"], row[f"{name} err"] = us, err
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
        del vs, dense
        torch.cuda.empty_cache()
    names = [key[:-3] for key in rows[0] if key.endswith(" us")]
    print(f"\n{dev}: microseconds per call (speedup vs cuBLAS bf16), path\n")
    print("| shape | batch | bf16 | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r[f'{s} us']:.1f} ({r['bf16_us'] / r[f'{s} us']:.2f}x) {r[f'{s} path'][0]} "
                 f"{list(r[f'{s} path'][1])}" if f"{s} us" in r else "" for s in names]
        print(f"| {r['shape']} | {r['m']} | {r['bf16_us']:.1f} | " + " | ".join(cells) + " |")
    print(f"\nfailures: {fails}; total {time.time() - t0:.0f}s")
    from kernels import write_result

    write_result({"device": dev, "rows": rows, "failures": fails}, "wa_ext_variants")


if __name__ == "__main__":
    main()
