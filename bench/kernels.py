"""Build, check and time every tensorslim kernel against cuBLAS bf16 and PyTorch's int4 tinygemm, in one run.

Run from the repo root on a CUDA machine (no install needed):
    python bench/kernels.py            # full: correctness sweep + timings (a few minutes on an H100)
    python bench/kernels.py --quick    # fewer shapes and batch sizes
    python bench/kernels.py --issue    # issue 7's targets only: the four large shapes at batch 1/16/64/128,
                                       # int3/int2/int8/ternary/Sum at batch 1 and 16 on 8192x28672
    python bench/kernels.py --sum      # only int4 g128 vs the fused Sum(int4, rank-32): its candidates checked on
                                       # 4096x4096, speed at batch 1/16 on 4096x14336, 8192x28672, 28672x8192
    python bench/kernels.py --check-only --sweep-jobs 15 --jobs 15   # the issue's whole correctness list (~5 min)
    python bench/kernels.py --new-formats  # only FP8 / MXFP4 / NVFP4 / BCQ / 2:4+int4 (bench/kernels_new_formats.py)
                                           # (with --quick: speed on 4096x14336 and 8192x28672 only)
Shapes are written ``in x out`` (``4096x14336`` is an up projection: K=4096 inputs, N=14336 outputs).
Correctness: every path against ``x @ decode()^T`` in fp32 (bf16 activations, fp32 output, so the only difference is
accumulation order), relative Frobenius error <= 1e-3, outputs poisoned with NaN before the kernel writes them;
"wa" also into a bf16 output (what a model gets; one more rounding, bound 4e-3), which caught a race in its split-K
reduction that fp32 outputs never showed (session 11).
Timing: ``triton.testing.do_bench`` median (L2 flushed between runs), bf16 activations and outputs.
Prints markdown tables and writes JSON to ``$OUT/kernels[_<modes>].json`` (or under ``runs/``), e.g.
``kernels_issue.json`` for ``--issue``, so that several commands in one device call keep their results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, "src")

import torch  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192), (576, 1536)]
BATCHES = [1, 2, 3, 7, 16, 33, 64, 128]
TOL = 1e-3


def fit(spec: str, k: int) -> str:
    """The odd shape (576 inputs) takes group 64 where a spec asks for 128."""
    return spec.replace("g128", "g64") if k % 128 else spec


def make_int(k: int, n: int, spec: str, seed: int = 0):
    from tensorslim.formats import parse_format, quantize_rtn

    spec = fit(spec, k)
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    fmt = parse_format(spec)
    if spec.startswith("ternary"):
        from tensorslim.formats.ternary import quantize_ternary

        return w, quantize_ternary(w, fmt)
    perm = torch.randperm(k, device="cuda", generator=g) if fmt.act_order else None
    return w, quantize_rtn(w, fmt, perm)


def make_lowrank(k: int, n: int, r: int, seed: int = 1):
    from tensorslim.formats.lowrank import LowRank, LowRankWeight

    g = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(n, r, device="cuda", generator=g) * 0.01
    v = torch.randn(r, k, device="cuda", generator=g) * 0.01
    return LowRankWeight.from_factors(LowRank(rank=r), u, v)


def check_choice(cw, x, choice, runtime: bool = False) -> float:
    """Relative error of one path vs the fp32 reference, with a NaN-poisoned output buffer. ``runtime``: ``choice``
    came from the dispatcher's runtime layout (what a model runs), whose "dequant" decodes the "wa" repack; otherwise
    from the full layout (every candidate), whose "dequant" decodes the transposed words."""
    from tensorslim.kernels import dispatch, ops
    from tensorslim.kernels.reference import reference_fp32, relative_error

    ref = reference_fp32(cw, x)
    path, config = choice
    base = dispatch._int_part(cw)
    lay = dispatch.layout(base)
    x2d = x if lay.perm is None else x.index_select(1, lay.perm)
    meta = [lay.k, lay.bits, lay.bits_a, lay.bits_b, lay.group, int(lay.symmetric)]
    if path == "dequant":
        if runtime and dispatch.runtime_layout(base).qa is None:  # dequant from the "wa" repack
            wl = dispatch.wa_of(lay)
            w = torch.full((lay.n, lay.k), float("nan"), device=x.device, dtype=x.dtype)
            ops.launch_wa_dequant(wl.q, wl.scales, wl.zeros, dispatch.wa_meta(wl), w)
        else:
            w = torch.full((lay.k, lay.n), float("nan"), device=x.device, dtype=x.dtype)
            ops.launch_int_dequant(lay.qa, lay.qb, lay.scales, lay.zeros, meta, w)
            w = w.t()
        # the dense matrix itself must be exact before cuBLAS rounds the product
        from tensorslim.kernels.layout import layout_decode

        err_w = relative_error(w.float(), layout_decode(lay).to(x.dtype).float())
        y = torch.nn.functional.linear(x2d, w).float()
        if cw is not base:
            t = torch.nn.functional.linear(x.float(), cw.extra.v.float())
            y = y + torch.nn.functional.linear(t, cw.extra.u.float())
        return max(err_w, relative_error(y, ref) / 4)  # bf16 weights: ~1.5e-3 by rounding alone, so bound 4e-3
    x2d = x2d.contiguous()
    lr = None
    pdl = ops.pdl_ok(x2d)
    if cw is not base:  # as the dispatcher runs it: V's exact parts in the layout's input order, lowrank_t's K-chunk
        # partials of t = x V^T; "wa" is then lowrank_t's programmatic dependent launch (Hopper+)
        vp = dispatch.v_parts(cw.extra, x.dtype, lay.perm)
        lr = (ops.launch_lowrank_t(x2d, vp, pdl and path == "wa"), cw.extra.u)
    split = config[2] if path == "wa" else config[3]
    if path == "wa":  # takes the partials; split-K as wa_mm runs it: through the workspace, into a poisoned output
        m = x2d.shape[0]
        scratch = ops.split_scratch(x.device, m, lay.n, -(-m // config[0]) * -(-lay.n // config[1])) \
            if split > 1 else None
        wl = dispatch.wa_of(lay)
        err = 0.0
        for dt in (torch.float32, x.dtype):  # fp32, and the activation dtype a model gets (one more rounding)
            out = torch.full((m, lay.n), float("nan"), device=x.device, dtype=dt)
            ops.launch_wa(x2d, wl.q, wl.scales, wl.zeros, *(lr or (None, None)), dispatch.wa_meta(wl), list(config),
                          out, pdl=pdl, scratch=scratch)
            err = max(err, relative_error(out.float(), ref) / (1 if dt == torch.float32 else 4))  # bf16: bound 4e-3
            if scratch is not None and (scratch[0].any() or scratch[1].any()):
                return float("inf")  # the workspace must be left clean
        return err
    out = torch.zeros(x.shape[0], lay.n, device=x.device) if split > 1 else \
        torch.full((x.shape[0], lay.n), float("nan"), device=x.device)
    lr = (lr[0].sum(0), lr[1]) if lr is not None else (None, None)  # the other kernels take their sum
    ops.launch_int_mm(x2d, lay.qa, lay.qb, lay.scales, lay.zeros, *lr, meta, path, list(config), out)
    return relative_error(out, ref)


def bench(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def tinygemm_fns(n: int, k: int, x: torch.Tensor, copies: int, group: int):
    """PyTorch's int4 tinygemm (``aten._weight_int4pack_mm``, torchao's int4 path) on matrices of the same shape."""
    fns = []
    inner = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
    for _ in range(copies):
        q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), inner)
        sz = torch.randn(k // group, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
        fns.append(lambda p=packed, z=sz: torch.ops.aten._weight_int4pack_mm(x, p, group, z))
    return fns


def bench_graph(fns, reps: int = 30, warm_s: float = 0.3) -> float:
    """Microseconds per call of ``fns`` (each on its own copy of the weights, together > 2x L2, so the weights come
    from HBM as in a real model), replayed as one CUDA graph (no Python/launch overhead) after ``warm_s`` seconds of
    replays (GPU clocks up); median over replays. The tuner's own timing (:func:`dispatch.time_graph`), with every
    function called once before the capture (compiles, tunes)."""
    from tensorslim.kernels.dispatch import time_graph

    return 1e3 * time_graph(lambda: [f() for f in fns], calls=1, reps=reps, per=len(fns), warm_s=warm_s)


def n_copies(nbytes: int) -> int:
    return max(2, min(48, -(-120_000_000 // nbytes)))


def _warm_task(task) -> int:
    """Compile every dispatcher candidate for one (shape, format, batches) in a worker process, so the timing
    process finds them in Triton's disk cache (tuning compiles 30-90 configs per batch bucket otherwise)."""
    k, n, spec, ms = task
    from tensorslim.formats import SumWeight, parse_format
    from tensorslim.kernels import dispatch

    cw = make_int(k, n, spec.split("+")[0])[1]
    if "lowrank" in spec:
        cw = SumWeight(format=parse_format(fit(spec, k)), shape=(n, k), base=cw, extra=make_lowrank(k, n, 32))
    lay = dispatch.layout(dispatch._int_part(cw))
    done = 0
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        lr = None
        if cw is not dispatch._int_part(cw):
            lr = (dispatch.v_parts(cw.extra, x.dtype, lay.perm), cw.extra.u)
        for c in dispatch.candidates(lay, dispatch._pow2(m)):
            try:
                dispatch.run_choice(c, lay, x, lr, torch.bfloat16)
                done += 1
            except Exception:  # the tuner skips what does not compile; so does the warm-up
                pass
    torch.cuda.synchronize()
    return done


def _sweep_task(task) -> tuple[list[dict], list[str]]:
    """Step 1 for one variant in a worker process: every candidate of ``spec`` (or, for ``("sum", base_spec)``, of
    the fused Sum on it) at each batch size, compiled and checked there. Returns the records and the skip/FAIL
    lines."""
    kind, spec, k, n, ms, seed = task
    from tensorslim.formats import SumWeight, parse_format
    from tensorslim.kernels import dispatch

    torch.manual_seed(seed)
    _, base = make_int(k, n, spec)
    cw, name = base, spec
    if kind == "sum":
        cw = SumWeight(format=parse_format(f"{spec}+lowrank:r32"), shape=(n, k), base=base,
                       extra=make_lowrank(k, n, 32))
        name = f"{spec}+lowrank:r32"
    records, lines = [], []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for c in dispatch.candidates(dispatch.layout(base), dispatch._pow2(m)):
            try:
                err = check_choice(cw, x, c)
            except Exception as e:  # the tuner skips configs the compiler rejects; so does the check
                if kind == "sum":
                    raise
                lines.append(f"skip {spec} m={m} {c}: {type(e).__name__}")
                continue
            records.append({"format": name, "shape": f"{k}x{n}", "m": m, "path": c[0], "config": list(c[1]),
                            "rel_err": err})
            if not err <= TOL:
                lines.append(f"FAIL {name} m={m} {c}: rel err {err:.2e}")
    torch.cuda.synchronize()
    return records, lines


def prewarm(tasks, jobs: int) -> None:
    import multiprocessing as mp

    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        n = sum(pool.map(_warm_task, tasks, chunksize=1))
    print(f"pre-compiled {n} candidate launches in {time.time() - t0:.0f}s ({jobs} processes)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=12,
                    help="processes that pre-compile the dispatcher's candidates for steps 2-3 (0: none)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a minute: a few correctness checks, no timings")
    ap.add_argument("--issue", action="store_true", help="issue 7's target shapes and batches only")
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip step 1 (every variant through every candidate on 4096x4096); the tuned choices are "
                         "still checked on every shape and batch")
    ap.add_argument("--sum", action="store_true", help="only int4 g128 vs the fused Sum(int4, rank-32)")
    ap.add_argument("--check-only", action="store_true", help="steps 1-2 (correctness), no timings")
    ap.add_argument("--sweep-only", action="store_true",
                    help="step 1 only (every candidate on 4096x4096; ~9 minutes on a fresh H100): with "
                         "'--check-only --no-sweep' (step 2) the full correctness list fits two 10-minute calls")
    ap.add_argument("--sweep-jobs", type=int, default=0,
                    help="step 1 in this many processes, each compiling and checking its own variants (0: compile in "
                         "--jobs processes, check here one by one). H100, session 10: 109 s instead of 547 s, so "
                         "'--check-only --sweep-jobs 15 --jobs 15' runs the issue's whole correctness list in one call")
    ap.add_argument("--new-formats", action="store_true",
                    help="only the FP8/MXFP4/NVFP4/BCQ/2:4+int4 kernels: correctness and speed at batch 1 and 16 "
                         "(bench/kernels_new_formats.py; a few minutes)")
    ap.add_argument("--specs", default="",
                    help="with --new-formats: a comma-separated subset of its formats (default: all)")
    args = ap.parse_args()
    if args.new_formats:
        from kernels_new_formats import run as run_new_formats

        run_new_formats(bench_graph, n_copies, quick=args.quick, specs=[s for s in args.specs.split(",") if s])
        return
    from tensorslim.formats import SumWeight, parse_format
    from tensorslim.kernels import dispatch

    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    shapes = [(4096, 4096), (8192, 28672), (576, 1536)] if args.quick else SHAPES
    batches = [1, 7, 16, 64] if args.quick else BATCHES
    results: dict = {"device": dev, "torch": torch.__version__, "correct": [], "speed": []}
    t0 = time.time()
    worst = 0.0

    # 1. every format variant through every candidate path on one shape
    variants = ["int4:g128", "int4:g128:sym", "int4:g64", "int4:g32", "int3:g128", "int3:g64:sym", "int2:g128",
                "int2:g32:sym", "int8:g128", "int8:pc:sym", "int4:g128:act", "int6:g128:sym", "ternary"]
    if args.quick:
        variants = ["int4:g128", "int4:g32:sym", "int3:g128", "int2:g64", "int8:pc:sym", "int4:g128:act", "ternary:g64"]
    if args.smoke:
        variants, shapes, batches = ["int4:g128", "int3:g64:sym", "ternary"], [(4096, 4096), (576, 1536)], [1, 16, 128]
    if args.issue:
        variants = ["int4:g128", "int4:g128:sym", "int3:g128", "int2:g128", "ternary"]
        shapes, batches = SHAPES[1:5], [1, 3, 16, 33, 64, 128]
    if args.sum:
        variants, shapes, batches = [], [(4096, 14336), (8192, 28672), (28672, 8192)], [1, 16]
    k, n = 4096, 4096
    if args.sweep_jobs and not args.no_sweep:  # step 1 split by variant over worker processes
        import multiprocessing as mp

        ms = (1, 7, 64) if not args.quick else (1, 7, 33, 128)
        tasks = [("int", spec, k, n, ms, i) for i, spec in enumerate(variants)]
        tasks += [("sum", "int4:g128", k, n, (1, 7, 33), 100), ("sum", "int4:g128:act", k, n, (1, 33), 101)]
        with mp.get_context("spawn").Pool(args.sweep_jobs) as pool:
            for records, lines in pool.imap(_sweep_task, tasks):
                results["correct"] += records
                worst = max([worst] + [r["rel_err"] for r in records if r["path"] != "dequant"])
                for line in lines:
                    print(line)
    swept = bool(args.sweep_jobs) and not args.no_sweep
    if args.jobs and not args.no_sweep and not args.smoke and not swept:  # step 1's candidates compiled in parallel
        prewarm([(k, n, spec, [1, 7, 64] if not args.quick else [1, 7, 33, 128]) for spec in variants]
                + [(k, n, "int4:g128+lowrank:r32", [1, 7, 33])], args.jobs)
    for spec in [] if args.no_sweep or swept else variants:
        _, cw = make_int(k, n, spec)
        lay = dispatch.layout(cw)
        for m in (1, 7, 64) if not args.quick else (1, 7, 33, 128):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for c in dispatch.candidates(lay, dispatch._pow2(m)):
                try:
                    err = check_choice(cw, x, c)
                except Exception as e:  # the tuner skips configs the compiler rejects; so does the check
                    print(f"skip {spec} m={m} {c}: {type(e).__name__}")
                    continue
                worst = max(worst, err if c[0] != "dequant" else 0.0)
                results["correct"].append({"format": spec, "shape": f"{k}x{n}", "m": m, "path": c[0],
                                           "config": list(c[1]), "rel_err": err})
                if not err <= TOL:
                    print(f"FAIL {spec} m={m} {c}: rel err {err:.2e}")
    # the fused Sum(int4, rank-32) through its candidates (and with act-order: V's parts permuted like x)
    for base_spec in ("int4:g128", "int4:g128:act") if not swept else ():
        _, base = make_int(k, n, base_spec)
        sw = SumWeight(format=parse_format(f"{base_spec}+lowrank:r32"), shape=(n, k), base=base,
                       extra=make_lowrank(k, n, 32))
        for m in () if args.no_sweep else (1, 7, 33) if base_spec == "int4:g128" else (1, 33):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for c in dispatch.candidates(dispatch.layout(base), dispatch._pow2(m)):
                err = check_choice(sw, x, c)
                results["correct"].append({"format": f"{base_spec}+lowrank:r32", "shape": f"{k}x{n}", "m": m,
                                           "path": c[0], "config": list(c[1]), "rel_err": err})
                if not err <= TOL:
                    print(f"FAIL sum {base_spec} m={m} {c}: rel err {err:.2e}")
    n1 = len(results["correct"])
    w1 = max((r["rel_err"] for r in results["correct"] if r["path"] != "dequant"), default=0.0)
    print(f"variants checked in {time.time() - t0:.0f}s: {n1} checks, worst relative error {w1:.1e} (dequant: "
          f"weights exact), {sum(1 for r in results['correct'] if not r['rel_err'] <= TOL)} over {TOL:g}", flush=True)
    write_result(results, run_name(args))
    if args.sweep_only:
        n_fail = sum(1 for r in results["correct"] if not r["rel_err"] <= TOL)
        assert n_fail == 0, f"{n_fail} checks failed"
        return

    # 2. int4 g128 on every shape and batch through the dispatcher (tuned choice), poisoned outputs
    if args.jobs and not args.smoke:
        both = sorted(set(batches) | {dispatch._pow2(m) for m in batches})
        tasks = [(k, n, "int4:g128", both) for k, n in shapes]
        if args.check_only:  # step 2 checks int4 only
            pass
        elif not (args.quick or args.issue or args.sum):  # step 3's formats
            tasks += [(k, n, s, [1, 4, 16, 64, 128]) for k, n in shapes
                      for s in ("int3:g128", "int2:g128", "int8:g128", "ternary:g128", "int4:g128+lowrank:r32")]
        else:
            tasks += [(8192, 28672, s, [1, 16]) for s in ("int3:g128", "int2:g128", "int8:g128", "ternary:g128",
                                                         "int4:g128+lowrank:r32") if not args.sum or "lowrank" in s]
            tasks += [(k, n, "int4:g128+lowrank:r32", [1, 16]) for k, n in shapes if args.sum]
        prewarm(tasks, args.jobs)
    for k, n in shapes:
        _, cw = make_int(k, n, "int4:g128")
        lay = dispatch.runtime_layout(cw)  # what a model's calls run
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            c = dispatch.tuned_choice(lay, x, None)
            err = check_choice(cw, x, c, runtime=True)
            results["correct"].append({"format": "int4:g128", "shape": f"{k}x{n}", "m": m, "path": c[0],
                                       "config": list(c[1]), "rel_err": err, "tuned": True})
            if not err <= TOL:
                print(f"FAIL int4 {k}x{n} m={m} {c}: rel err {err:.2e}")
    n_fail = sum(1 for r in results["correct"] if not r["rel_err"] <= TOL)
    print(f"correctness: {len(results['correct'])} checks, {n_fail} over {TOL:g} "
          f"(dequant path: weight exactness and output/4) ({time.time() - t0:.0f}s)")

    if args.smoke or args.check_only:
        write_result(results, run_name(args))
        assert n_fail == 0, f"{n_fail} checks failed"
        return
    # 3. speed: CUDA-graph replay over rotating weight copies (cold L2), plus eager do_bench for int4 (overhead)

    speed_batches = [1, 16] if args.sum else [1, 16, 64] if args.quick else [1, 16, 64, 128] if args.issue \
        else [1, 4, 16, 64, 128]
    other_batches = {1, 16}
    rows = []
    for k, n in shapes:
        specs_here = ["int4:g128"]
        if args.sum:
            specs_here.append("int4:g128+lowrank:r32")
        elif (k, n) == (8192, 28672) or not (args.quick or args.issue):
            specs_here += ["int3:g128", "int2:g128", "int8:g128", "ternary:g128", "int4:g128+lowrank:r32"]
        weights: dict[str, list] = {}
        for spec in specs_here:
            base = spec.split("+")[0]
            cws = []
            for i in range(n_copies(int(parse_format(fit(base, k)).nbytes((n, k))))):
                cw = make_int(k, n, base, seed=i)[1]
                if "lowrank" in spec:
                    cw = SumWeight(format=parse_format(fit(base, k) + "+lowrank:r32"), shape=(n, k), base=cw,
                                   extra=make_lowrank(k, n, 32, seed=100 + i))
                cws.append(cw)
            weights[spec] = cws
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        for m in speed_batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])
            try:
                t_tiny = bench_graph(tinygemm_fns(n, k, x, n_copies(n * k // 2), 128 if k % 128 == 0 else 64))
            except Exception as e:  # API differences between torch versions: report, don't fail
                print(f"tinygemm unavailable: {e}")
                t_tiny = float("nan")
            row = {"shape": f"{k}x{n}", "m": m, "bf16_us": t_bf16, "tinygemm_int4_us": t_tiny}
            for spec, cws in weights.items():
                if spec != "int4:g128" and m not in other_batches:
                    continue
                lay = dispatch.runtime_layout(dispatch._int_part(cws[0]))  # the choice kernel_linear times
                row[f"{spec}_path"] = dispatch.tuned_choice(lay, x, 32 if "lowrank" in spec else None)
                row[f"{spec}_us"] = bench_graph([lambda c=c: dispatch.kernel_linear(c, x) for c in cws])
            row["int4:g128_eager_us"] = bench(lambda: dispatch.kernel_linear(weights["int4:g128"][0], x))
            rows.append(row)
            print(json.dumps(row, default=str))
    results["speed"] = rows
    print(f"\n{dev}: microseconds per call, CUDA-graph replay over rotating weight copies, median "
          "(speedup vs cuBLAS bf16); 'eager' = int4 through the Python dispatcher, do_bench median\n")
    specs = ["int4:g128", "int3:g128", "int2:g128", "int8:g128", "ternary:g128", "int4:g128+lowrank:r32"]
    print("| shape (in x out) | batch | bf16 | tinygemm int4 g128 | " + " | ".join(specs)
          + " | int4 eager | int4 path |")
    print("|---|---|---|---|" + "---|" * len(specs) + "---|---|")
    for r in rows:
        cells = []
        for s in specs:
            t = r.get(f"{s}_us")
            cells.append("" if t is None else f"{t:.1f} ({r['bf16_us'] / t:.2f}x)")
        tt = r["tinygemm_int4_us"]
        print(f"| {r['shape']} | {r['m']} | {r['bf16_us']:.1f} | {tt:.1f} ({r['bf16_us'] / tt:.2f}x) | "
              + " | ".join(cells) + f" | {r['int4:g128_eager_us']:.1f} | {r['int4:g128_path'][0]} "
              f"{list(r['int4:g128_path'][1])} |")
    print(f"\nworst relative error of a fused kernel: {worst:.2e}; failures: {n_fail}; total {time.time() - t0:.0f}s")
    write_result(results, run_name(args))


def run_name(args) -> str:
    """The JSON's name for this command line: ``kernels`` plus the modes given (``kernels_sweep``,
    ``kernels_check_issue``, ...)."""
    modes = [m for m, on in (("sweep", args.sweep_only), ("check", args.check_only), ("quick", args.quick),
                              ("smoke", args.smoke), ("issue", args.issue), ("sum", args.sum)) if on]
    return "_".join(["kernels"] + modes)


def write_result(results: dict, name: str = "kernels") -> None:
    """``$OUT/<name>.json`` (or under ``runs/``), written atomically; ``name`` tells the mode (``kernels_issue``,
    ``kernels_sweep``, ...), so that two commands in one device call do not overwrite each other's results."""
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
