"""``prepare_kernels()`` for MXFP4, NVFP4 and BCQ3 on the GPU: correctness, GPU memory and speed, one device call.

Session 13 built ``CompressedLinear.prepare_kernels()`` for these formats (the module keeps only the weights-as-A
repack on the GPU and runs every batch size through "wa") and tested it under Triton's interpreter only. This bench
runs it on the GPU:

1. Correctness: a ``CompressedLinear`` per format on 4096x14336 and an odd 576x1536 (in x out), before and after
   ``prepare_kernels()``: prepared, at the issue's batch sizes 1, 2, 3, 7, 16, 33, 64, 128 with bf16 activations
   (and 16 rows of fp16), the module's own 16-bit output against ``x @ decode()^T`` in fp32 (relative error <= 4e-3: one
   rounding of the output, as ``bench/kernels.py``'s 16-bit checks) and the fp32 output of the same repack (<= 1e-3; 4e-3 where the
   tuner chose "dequant", which rounds the weights to the activation dtype);
   unprepared (the dispatcher's tuned choice, checked since session 13) at 1 and 16 bf16 rows; on 576x1536 no "wa"
   block fits and ``prepare_kernels()`` must decline.
2. GPU memory per module: the stored weight, what the dispatcher adds on the first calls (kernel layout + "wa"
   repack, counted from their tensors), what ``prepare_kernels()`` keeps (the repack), and the drop in
   ``torch.cuda.memory_allocated()`` that ``prepare_kernels()`` causes.
3. Speed of the module's forward at 1, 16, 64 and 256 rows on 4096x14336: unprepared (the
   dispatcher's tuned choice among all paths), prepared ("wa" alone, tuned among its configs), BCQ3 also with
   1024-input blocks (``J = 64``, "wa" alone) against cuBLAS bf16, CUDA-graph replays over module copies that
   exceed twice the L2 cache, median (``bench/kernels.py``'s ``bench_graph``).

    python bench/prepared_ext.py --jobs 15        # on the GPU; writes $OUT/prepared_ext.json (or runs/)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, "src")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SPECS = ("mxfp4", "nvfp4", "bcq3")
CHECK_SHAPES = [(4096, 14336), (576, 1536)]  # (in, out)
CHECK_ROWS = [1, 2, 3, 7, 16, 33, 64, 128]
UNPREPARED_ROWS = (1, 16)  # the unprepared dispatcher (all paths, checked since session 13)
FP16_ROWS = (16,)  # fp16 activations (the self-check runs them too)
SPEED_SHAPES = [(4096, 14336)]
SPEED_ROWS = [1, 16, 64, 256]
TOL = 1e-3


def tensor_bytes(obj) -> int:
    """Bytes of the CUDA tensors among a dataclass's fields (a kernel layout or a repack)."""
    import dataclasses

    if obj is None:
        return 0
    return sum(v.untyped_storage().nbytes() for f in dataclasses.fields(obj)
               if isinstance(v := getattr(obj, f.name), torch.Tensor) and v.is_cuda)


def check_part() -> tuple[list[dict], int]:
    from tensorslim.formats import CompressedLinear
    from tensorslim.kernels import dispatch_ext
    from tensorslim.kernels.reference import reference_fp32, relative_error
    from wa_ext_variants import make

    rows, fails = [], 0
    for spec in SPECS:
        for k, n in CHECK_SHAPES:
            cw = make(spec, k, n, "cuda")
            mod = CompressedLinear(cw)
            fits = dispatch_ext.wa_ext_reason(cw) is None  # 576 inputs: no "wa" block fits, nothing to prepare
            xs = {(torch.bfloat16, m): torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in CHECK_ROWS}
            xs.update({(torch.float16, m): torch.randn(m, k, device="cuda", dtype=torch.float16) for m in FP16_ROWS})
            refs = {key: reference_fp32(cw, x) for key, x in xs.items()}
            row = {"format": spec, "shape": f"{k}x{n}", "stored_bytes": cw.nbytes}
            unprep = [key for key in xs if key[0] == torch.bfloat16 and key[1] in UNPREPARED_ROWS]
            row["unprepared_err16"] = max(relative_error(mod(xs[key]).float(), refs[key]) for key in unprep)
            row["unprepared_rows"] = [m for _, m in unprep]
            extra = tensor_bytes(dispatch_ext._LAYOUTS.get(cw)) + tensor_bytes(dispatch_ext._WAEXT.get(cw))
            row["runtime_gpu_bytes"] = cw.nbytes + extra
            torch.cuda.synchronize()
            gc.collect()
            before = torch.cuda.memory_allocated()
            del cw
            row["prepared"] = mod.prepare_kernels()
            torch.cuda.synchronize()
            gc.collect()
            row["allocated_drop_bytes"] = before - torch.cuda.memory_allocated()
            ok = row["unprepared_err16"] <= 4 * TOL and row["prepared"] == fits
            if row["prepared"]:
                wl = mod._kernel[2]
                row["prepared_gpu_bytes"] = tensor_bytes(wl)
                row["stored_device"] = str(mod.compressed.device)
                errs16, errs32 = [], []
                for key, x in xs.items():
                    errs16.append(relative_error(mod(x).float(), refs[key]))
                    y32 = dispatch_ext.wa_layout_linear(wl, x, out_dtype=torch.float32)
                    # "dequant" rounds the weights to the activation dtype, then cuBLAS: its bound is 4e-3
                    scale = 4 if dispatch_ext.wa_choice(wl, x)[0] == "dequant" else 1
                    errs32.append(relative_error(y32, refs[key]) / scale)
                row["prepared_err16"], row["prepared_err32"] = max(errs16), max(errs32)
                ok = ok and row["prepared_err16"] <= 4 * TOL and row["prepared_err32"] <= TOL
            fails += not ok
            row["ok"] = ok
            rows.append(row)
            print(("" if ok else "FAIL ") + json.dumps(row), flush=True)
            del mod, xs, refs
            gc.collect()
    return rows, fails


def speed_part(rows_list: list[int]) -> list[dict]:
    import dataclasses

    from kernels import bench_graph, n_copies
    from tensorslim.formats import CompressedLinear
    from tensorslim.kernels import dispatch_ext
    from tensorslim.kernels.layout_ext import bcq_wa_layout
    from wa_ext_variants import make

    out = []
    for k, n in SPEED_SHAPES:
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        variants = {}
        for spec in SPECS:
            cw = make(spec, k, n, "cuda")
            copies = n_copies(cw.nbytes)
            unprep = [CompressedLinear(dataclasses.replace(cw)) for _ in range(copies)]
            prep = [CompressedLinear(dataclasses.replace(cw)) for _ in range(copies)]
            if not all(m_.prepare_kernels() for m_ in prep):
                print(f"{spec} {k}x{n}: prepare_kernels() declined", flush=True)
                prep = None
            variants[f"{spec} unprepared"] = unprep
            if prep:
                variants[f"{spec} prepared"] = prep
            if spec == "bcq3" and k % 1024 == 0:
                wls = [bcq_wa_layout(dataclasses.replace(cw), 64) for _ in range(copies)]
                variants["bcq3 J64 wa"] = wls
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{k}x{n}", "m": m,
                   "bf16_us": bench_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])}
            for name, objs in variants.items():
                if name.endswith("J64 wa"):
                    fns = [lambda w=w: dispatch_ext.wa_layout_linear(w, x) for w in objs]
                else:
                    fns = [lambda mod=mod: mod(x) for mod in objs]
                fns[0]()  # tunes (first call per bucket)
                row[f"{name} us"] = bench_graph(fns)
                if name.endswith("unprepared"):
                    row[f"{name} path"] = dispatch_ext.runtime_choice(objs[0].compressed, x)
                else:  # a prepared module's repack, or the J = 64 repack itself
                    row[f"{name} path"] = dispatch_ext.wa_choice(objs[0] if name.endswith("J64 wa")
                                                                 else objs[0]._kernel[2], x)
            out.append(row)
            print(json.dumps(row, default=str), flush=True)
        del dense, variants
        gc.collect()
        torch.cuda.empty_cache()
    return out


def _warm(task) -> int:
    """Compile every candidate one (format, shape, rows, dtype) will tune, in a worker (Triton's disk cache):
    ``what`` "both" (the unprepared module, the prepared one and, BCQ, J = 64), "prepared" or "unprepared"."""
    import dataclasses

    spec, k, n, m, dtype, what = task
    from tensorslim.formats import CompressedLinear
    from tensorslim.kernels import dispatch_ext
    from tensorslim.kernels.layout_ext import bcq_wa_layout
    from wa_ext_variants import make

    cw = make(spec, k, n, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    if what != "prepared":
        CompressedLinear(dataclasses.replace(cw))(x)
    mod = CompressedLinear(dataclasses.replace(cw))
    if what != "unprepared" and mod.prepare_kernels():
        mod(x)
    if what == "both" and spec == "bcq3" and k % 1024 == 0:
        dispatch_ext.wa_layout_linear(bcq_wa_layout(cw, 64), x)
    torch.cuda.synchronize()
    return 1


def warm_tasks(rows_list: list[int]) -> list[tuple]:
    from tensorslim.kernels.dispatch import _pow2

    bf, fp = torch.bfloat16, torch.float16
    k, n = CHECK_SHAPES[0]
    buckets = sorted({_pow2(m) for m in CHECK_ROWS})
    tasks = [(s, k, n, m, bf, "prepared") for s in SPECS for m in buckets]
    tasks += [(s, k, n, m, fp, "prepared") for s in SPECS for m in FP16_ROWS]
    tasks += [(s, k_, n_, m, bf, "unprepared") for s in SPECS for k_, n_ in CHECK_SHAPES for m in UNPREPARED_ROWS]
    tasks += [(s, k_, n_, m, bf, "both") for s in SPECS for k_, n_ in SPEED_SHAPES for m in rows_list]
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=0, help="compile the tuner's candidates in this many processes first")
    ap.add_argument("--rows", default=",".join(map(str, SPEED_ROWS)), help="batch sizes of part 3 ('' skips it)")
    args = ap.parse_args()
    rows_list = [int(m) for m in args.rows.split(",")] if args.rows else []
    t0 = time.time()
    if args.jobs:
        import multiprocessing as mp

        tasks = warm_tasks(rows_list)
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            pool.map(_warm, tasks, chunksize=1)
        print(f"pre-compiled {len(tasks)} tasks in {time.time() - t0:.0f}s", flush=True)
    dev = torch.cuda.get_device_name()
    print(f"prepared_ext: {dev}; torch {torch.__version__}; triton {__import__('triton').__version__}", flush=True)
    checks, fails = check_part()
    speed = speed_part(rows_list) if rows_list else []
    if speed:
        names = [key[:-3] for key in speed[0] if key.endswith(" us") and key != "bf16_us"]
        print(f"\n{dev}: microseconds per call (speedup vs cuBLAS bf16), path\n")
        print("| shape | rows | bf16 | " + " | ".join(names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        for r in speed:
            cells = [f"{r[f'{s} us']:.1f} ({r['bf16_us'] / r[f'{s} us']:.2f}x) {r.get(f'{s} path')}" for s in names]
            print(f"| {r['shape']} | {r['m']} | {r['bf16_us']:.1f} | " + " | ".join(cells) + " |")
    print(f"\ncheck failures: {fails}; total {time.time() - t0:.0f}s", flush=True)
    from kernels import write_result

    write_result({"device": dev, "torch": torch.__version__, "checks": checks, "speed": speed, "failures": fails},
                 "prepared_ext")


if __name__ == "__main__":
    main()
