"""``python bench/kernels.py --new-formats``: check and time the FP8 / MXFP4 / NVFP4 / BCQ / 2:4+int4 kernels.

1. Correctness (bf16 activations, fp32 output, NaN-poisoned buffer; MXFP4 "wa" also into bf16 outputs, bound
   4e-3): every dispatcher candidate of every format at
   batch 1, 2, 3, 7, 16, 33 on 4096x14336 and 576x1536, then the tuned choice on the issue's shapes at batch 1 and
   16, against ``x @ decode()^T`` in fp32, relative Frobenius error <= 1e-3 (the "reference" path,
   bf16 weights, is bounded by 4e-3 like the int "dequant" path).
2. Speed at batch 1 and 16 on 4096x14336, 14336x4096, 8192x28672, 28672x8192: CUDA-graph replay over rotating
   weight copies (weights from HBM), median, against cuBLAS bf16 in the same run; plus the opt-in FP8 x FP8
   ``torch._scaled_mm`` path (activations quantized per row: its error is reported, not held to 1e-3).
Weights: random (0.02 std); BCQ is the exact binary-coded form of int3 g128 RTN (the ALS fit is too slow for a 7B
layer), 2:4 keeps the 2 largest of every 4 (magnitude) and stores them as int4 g128.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

SPECS = ["fp8:e4m3", "mxfp4", "nvfp4", "bcq3:g128", "sparse:2:4+int4:g128"]
SHAPES = [(4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
TOL = 1e-3


def make(spec: str, k: int, n: int, seed: int = 0, device: str = "cuda"):
    from tensorslim.formats import parse_format, quantize_rtn
    from tensorslim.formats.bcq import bcq_from_intgroup
    from tensorslim.formats.fp8 import quantize_fp8
    from tensorslim.formats.mx import quantize_mx, quantize_nvfp4
    from tensorslim.formats.sparse import encode_sparse

    if k % 128:
        spec = spec.replace("g128", "g64")
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, device=device, generator=g) * 0.02
    if spec.startswith("bcq"):
        return bcq_from_intgroup(quantize_rtn(w, parse_format(f"int{spec[3]}:{spec.split(':')[1]}")))
    fmt = parse_format(spec)
    if spec.startswith("sparse"):
        top = w.abs().reshape(n, k // 4, 4).topk(2, dim=-1).indices
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(-1, top, True).reshape(n, k)
        return encode_sparse(fmt, w, mask)
    return {"fp8": quantize_fp8, "mxfp": quantize_mx, "nvfp": quantize_nvfp4}[fmt.family](w, fmt)


def check(cw, x, choice) -> float:
    """Relative error of one path against the fp32 reference, written into a NaN-poisoned (or zeroed) buffer."""
    from tensorslim.kernels import dispatch_ext, ops_ext
    from tensorslim.kernels.layout_ext import BCQKernelLayout, FloatKernelLayout
    from tensorslim.kernels.reference import reference_fp32, relative_error

    ref = reference_fp32(cw, x)
    path, config = choice
    if path in ("reference", "dequant"):  # the weights rounded to bf16, then cuBLAS: bound 4e-3
        return relative_error(dispatch_ext.run_choice(choice, cw, None, x, torch.float32), ref) / 4
    lay = dispatch_ext.layout(cw)
    if path == "dense":  # 2:4 + int4 as dense int4 on the integer kernels: fp32 and bf16 outputs
        from tensorslim.kernels import dispatch

        y32 = dispatch_ext.run_choice(choice, cw, lay, x, torch.float32)
        y16 = dispatch_ext.run_choice(choice, cw, lay, x, x.dtype)
        inner = dispatch.tuned_choice(dispatch_ext.dense_layout(cw), x, None)[0]
        scale = 4 if inner == "dequant" else 1  # that path's product comes from cuBLAS in bf16: bound 4e-3
        return max(relative_error(y32, ref) / scale, relative_error(y16.float(), ref) / 4)
    if path == "wa":  # MXFP4 / NVFP4 / BCQ weights-as-A: fp32 into a poisoned (or, split-K, zeroed) buffer, and bf16
        wl = dispatch_ext.wa_ext(cw)
        out = torch.zeros(x.shape[0], lay.n, device=x.device) if config[2] > 1 else \
            torch.full((x.shape[0], lay.n), float("nan"), device=x.device)
        dispatch_ext.launch_wa_ext(wl, x, config, out)
        y16 = dispatch_ext.wa_ext_mm(wl, x, config, x.dtype)  # serial split-K
        return max(relative_error(out, ref), relative_error(y16.float(), ref) / 4)
    out = torch.zeros(x.shape[0], lay.n, device=x.device) if config[3] > 1 else \
        torch.full((x.shape[0], lay.n), float("nan"), device=x.device)
    cfg = list(config)
    if isinstance(lay, FloatKernelLayout):
        ops_ext.launch_float_mm(x, lay.q, lay.scales, lay.global_scale, lay.meta(), path, cfg, out)
    elif isinstance(lay, BCQKernelLayout):
        ops_ext.launch_bcq_mm(x, lay.planes, lay.alphas, lay.offsets, lay.meta(), path, cfg, out)
    else:
        ops_ext.launch_sparse24_mm(x, lay.inner.qa, lay.idx, lay.inner.scales, lay.inner.zeros, lay.meta(), path,
                                   cfg, out)
    return relative_error(out, ref)


def save(results: dict) -> None:
    """Written after each stage, so a run cut short by a time limit still leaves its numbers."""
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels_new_formats.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


def run(bench_graph, n_copies, quick: bool = False, specs: list[str] | None = None) -> None:
    """``quick``: speed on 4096x14336 and 8192x28672 only; ``specs``: a subset of :data:`SPECS`."""
    from tensorslim.kernels import dispatch_ext

    unknown = set(specs or []) - set(SPECS)
    if unknown:
        raise SystemExit(f"--specs: unknown {sorted(unknown)}; choose from {SPECS}")
    chosen = [s for s in SPECS if not specs or s in specs]

    dev = torch.cuda.get_device_name()
    print(f"new formats: {dev}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    t0 = time.time()
    results: dict = {"device": dev, "correct": [], "speed": []}

    def record(spec, shape, m, c, err, tuned=False):
        results["correct"].append({"format": spec, "shape": shape, "m": m, "path": c[0], "config": list(c[1]),
                                   "rel_err": err, "tuned": tuned})
        if not err <= TOL:
            print(f"FAIL {spec} {shape} m={m} {c}: rel err {err:.2e}")

    # 1a. every candidate: batch 1 with those for 1 row, batch 2-33 with those for 16 rows (valid for any batch;
    # reusing them keeps the number of compiles, the bulk of this run, down)
    for k, n in [(4096, 14336), (576, 1536)]:
        for spec in chosen:
            cw = make(spec, k, n)
            for m in (1, 2, 3, 7, 16, 33):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for c in dispatch_ext.candidates(cw, dispatch_ext.layout(cw), 1 if m == 1 else 16, x.dtype):
                    try:
                        err = check(cw, x, c)
                    except Exception as e:  # the tuner skips configs the compiler rejects; report them
                        print(f"skip {spec} {k}x{n} m={m} {c}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    record(spec, f"{k}x{n}", m, c, err)
        print(f"candidates checked ({time.time() - t0:.0f}s)")
    shapes = [SHAPES[0], SHAPES[2]] if quick else SHAPES
    # 1b. the tuned choice on the issue shapes (tunes them for step 2)
    for k, n in shapes:
        for spec in chosen:
            cw = make(spec, k, n)
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                c = dispatch_ext.runtime_choice(cw, x)
                record(spec, f"{k}x{n}", m, c, check(cw, x, c), True)
    n_fail = sum(1 for r in results["correct"] if not r["rel_err"] <= TOL)
    worst = max(r["rel_err"] for r in results["correct"])
    save(results)
    print(f"correctness: {len(results['correct'])} checks, {n_fail} over {TOL:g}, worst {worst:.2e} "
          f"({time.time() - t0:.0f}s)")

    # 2. speed against cuBLAS bf16
    from tensorslim.kernels import dispatch

    rows = []
    results["speed"] = rows
    for k, n in shapes:
        weights = {}
        for spec in chosen:
            cw = make(spec, k, n)
            nbytes = cw.nbytes
            weights[spec] = [dataclasses.replace(cw) for _ in range(n_copies(nbytes))]  # own kernel layouts each
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{k}x{n}", "m": m,
                   "bf16_us": bench_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])}
            for spec, cws in weights.items():
                row[f"{spec}_path"] = dispatch_ext.runtime_choice(cws[0], x)
                row[f"{spec}_us"] = bench_graph([lambda c=c: dispatch.kernel_linear(c, x) for c in cws])
            row["scaled_mm_us"] = float("nan")
            try:  # opt-in FP8 x FP8 (activations quantized per row): its own column, never dispatched
                if "fp8:e4m3" not in weights:
                    raise LookupError("fp8:e4m3 is not among --specs")
                from tensorslim.kernels.reference import reference_fp32, relative_error
                from tensorslim.kernels.scaled_mm import fp8_scaled_mm_linear

                fp8 = [dataclasses.replace(c, codes=c.codes.clone()) for c in weights["fp8:e4m3"]]  # own codes each
                row["scaled_mm_rel_err"] = relative_error(fp8_scaled_mm_linear(fp8[0], x).float(),
                                                          reference_fp32(fp8[0], x))
                row["scaled_mm_us"] = bench_graph([lambda c=c: fp8_scaled_mm_linear(c, x) for c in fp8])
            except Exception as e:  # API differences between torch versions: report, don't fail
                print(f"_scaled_mm unavailable: {type(e).__name__}: {str(e)[:200]}")
                row["scaled_mm_us"] = float("nan")
            rows.append(row)
            save(results)
            print(json.dumps(row, default=str))
        del weights, dense
        torch.cuda.empty_cache()
    print(f"\n{dev}: microseconds per call, CUDA-graph replay over rotating weight copies, median "
          "(speedup vs cuBLAS bf16); tuned path below each\n")
    print("| shape (in x out) | batch | bf16 | " + " | ".join(chosen) + " | fp8 _scaled_mm (x in FP8; rel err) |")
    print("|---|---|---|" + "---|" * len(chosen) + "---|")
    for r in rows:
        cells = [f"{r[f'{s}_us']:.1f} ({r['bf16_us'] / r[f'{s}_us']:.2f}x) {r[f'{s}_path'][0]} "
                 f"{list(r[f'{s}_path'][1])}" for s in chosen]
        t = r["scaled_mm_us"]
        cells.append(f"{t:.1f} ({r['bf16_us'] / t:.2f}x; {r.get('scaled_mm_rel_err', float('nan')):.1e})")
        print(f"| {r['shape']} | {r['m']} | {r['bf16_us']:.1f} | " + " | ".join(cells) + " |")
    print(f"\nfailures: {n_fail}; worst relative error {worst:.2e}; total {time.time() - t0:.0f}s")
