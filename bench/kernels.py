"""Build, check and time every tensorslim kernel against cuBLAS bf16 and PyTorch's int4 tinygemm, in one run.

Run from the repo root on a CUDA machine (no install needed):
    python bench/kernels.py            # full: correctness sweep + timings (a few minutes on an H100)
    python bench/kernels.py --quick    # fewer shapes and batch sizes
Shapes are written ``in x out`` (``4096x14336`` is an up projection: K=4096 inputs, N=14336 outputs).
Correctness: every path against ``x @ decode()^T`` in fp32 (bf16 activations, fp32 output, so the only difference is
accumulation order), relative Frobenius error <= 1e-3, outputs poisoned with NaN before the kernel writes them.
Timing: ``triton.testing.do_bench`` median (L2 flushed between runs), bf16 activations and outputs.
Prints markdown tables and writes JSON to ``$OUT/kernels.json`` (or ``runs/kernels.json``).
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
    perm = torch.randperm(k, device="cuda", generator=g) if fmt.act_order else None
    return w, quantize_rtn(w, fmt, perm)


def make_lowrank(k: int, n: int, r: int, seed: int = 1):
    from tensorslim.formats.lowrank import LowRank, LowRankWeight

    g = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(n, r, device="cuda", generator=g) * 0.01
    v = torch.randn(r, k, device="cuda", generator=g) * 0.01
    return LowRankWeight.from_factors(LowRank(rank=r), u, v)


def check_choice(cw, x, choice) -> float:
    """Relative error of one path vs the fp32 reference, with a NaN-poisoned output buffer."""
    from tensorslim.kernels import dispatch, ops
    from tensorslim.kernels.reference import reference_fp32, relative_error

    ref = reference_fp32(cw, x)
    path, config = choice
    base = dispatch._int_part(cw)
    lay = dispatch.layout(base)
    x2d = x if lay.perm is None else x.index_select(1, lay.perm)
    meta = [lay.k, lay.bits, lay.bits_a, lay.bits_b, lay.group, int(lay.symmetric)]
    if path == "dequant":
        w = torch.full((lay.k, lay.n), float("nan"), device=x.device, dtype=x.dtype)
        ops.launch_int_dequant(lay.qa, lay.qb, lay.scales, lay.zeros, meta, w)
        w = w.t()
        # the dense matrix itself must be exact before cuBLAS rounds the product
        from tensorslim.kernels.layout import layout_decode

        err_w = relative_error(w.float(), layout_decode(lay).to(x.dtype).float())
        y = torch.nn.functional.linear(x2d, w).float()
        if cw is not base:
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(x.float(), cw.extra.v.float()), cw.extra.u.float())
        return max(err_w, relative_error(y, ref) / 4)  # bf16 weights: ~1.5e-3 by rounding alone, so bound 4e-3
    lr = None
    if cw is not base:
        lr = (torch.nn.functional.linear(x2d.float(), cw.extra.v.float()), cw.extra.u)
    split = config[3]
    out = torch.zeros(x.shape[0], lay.n, device=x.device) if split > 1 else \
        torch.full((x.shape[0], lay.n), float("nan"), device=x.device)
    ops.launch_int_mm(x2d.contiguous(), lay.qa, lay.qb, lay.scales, lay.zeros, *(lr or (None, None)), meta, path,
                      list(config), out)
    return relative_error(out, ref)


def bench(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def tinygemm(w: torch.Tensor, x: torch.Tensor, group: int = 128):
    """PyTorch's int4 tinygemm (``aten._weight_int4pack_mm``, torchao's int4 path) on the same matrix."""
    n, k = w.shape
    q = torch.randint(0, 16, (n, k), device=w.device, dtype=torch.int32)
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    sz = torch.randn(k // group, n, 2, device=w.device, dtype=torch.bfloat16) * 0.01
    return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
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
                "int2:g64", "int8:g128", "int8:pc:sym", "int4:g128:act", "int5:g64", "int6:g128:sym"]
    if args.quick:
        variants = ["int4:g128", "int4:g32:sym", "int3:g128", "int2:g64", "int8:pc:sym", "int4:g128:act"]
    k, n = 4096, 4096
    for spec in variants:
        _, cw = make_int(k, n, spec)
        lay = dispatch.layout(cw)
        for m in (1, 3, 7, 33, 128):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for c in dispatch.candidates(lay, dispatch._pow2(m)):
                err = check_choice(cw, x, c)
                worst = max(worst, err if c[0] != "dequant" else 0.0)
                results["correct"].append({"format": spec, "shape": f"{k}x{n}", "m": m, "path": c[0],
                                           "config": list(c[1]), "rel_err": err})
                if not err <= TOL:
                    print(f"FAIL {spec} m={m} {c}: rel err {err:.2e}")
    # the fused Sum(int4, rank-32) through its candidates
    _, base = make_int(k, n, "int4:g128")
    sw = SumWeight(format=parse_format("int4:g128+lowrank:r32"), shape=(n, k), base=base,
                   extra=make_lowrank(k, n, 32))
    for m in (1, 7, 33):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for c in dispatch.candidates(dispatch.layout(base), dispatch._pow2(m)):
            err = check_choice(sw, x, c)
            results["correct"].append({"format": "int4:g128+lowrank:r32", "shape": f"{k}x{n}", "m": m, "path": c[0],
                                       "config": list(c[1]), "rel_err": err})
            if not err <= TOL:
                print(f"FAIL sum m={m} {c}: rel err {err:.2e}")
    print(f"variants checked in {time.time() - t0:.0f}s")

    # 2. int4 g128 on every shape and batch through the dispatcher (tuned choice), poisoned outputs
    for k, n in shapes:
        _, cw = make_int(k, n, "int4:g128")
        lay = dispatch.layout(cw)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            c = dispatch.tuned_choice(lay, x, None)
            err = check_choice(cw, x, c)
            results["correct"].append({"format": "int4:g128", "shape": f"{k}x{n}", "m": m, "path": c[0],
                                       "config": list(c[1]), "rel_err": err, "tuned": True})
            if not err <= TOL:
                print(f"FAIL int4 {k}x{n} m={m} {c}: rel err {err:.2e}")
    n_fail = sum(1 for r in results["correct"] if not r["rel_err"] <= TOL)
    print(f"correctness: {len(results['correct'])} checks, {n_fail} over {TOL:g} "
          f"(dequant path: weight exactness and output/4) ({time.time() - t0:.0f}s)")

    # 3. speed
    speed_batches = [1, 16, 64] if args.quick else [1, 4, 16, 64, 128]
    rows = []
    for k, n in shapes:
        w, cw4 = make_int(k, n, "int4:g128")
        wb = w.to(torch.bfloat16)
        others = {}
        if (k, n) == (8192, 28672) or not args.quick:
            for spec in ("int3:g128", "int2:g128", "int8:g128"):
                others[spec] = make_int(k, n, spec)[1]
            others["int4:g128+lowrank:r32"] = SumWeight(format=parse_format(fit("int4:g128", k) + "+lowrank:r32"),
                                                       shape=(n, k), base=cw4,
                                                       extra=make_lowrank(k, n, 32))
        for m in speed_batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench(lambda: torch.nn.functional.linear(x, wb))
            try:
                t_tiny = bench(tinygemm(w, x, 128 if k % 128 == 0 else 64))
            except Exception as e:  # API differences between torch versions: report, don't fail
                print(f"tinygemm unavailable: {e}")
                t_tiny = float("nan")
            row = {"shape": f"{k}x{n}", "m": m, "bf16_us": t_bf16, "tinygemm_int4_us": t_tiny}
            for spec, c in {"int4:g128": cw4, **others}.items():
                lay = dispatch.layout(dispatch._int_part(c))
                rank = 32 if "lowrank" in spec else None
                row[f"{spec}_path"] = dispatch.tuned_choice(lay, x, rank)
                row[f"{spec}_us"] = bench(lambda: dispatch.kernel_linear(c, x))
            rows.append(row)
            print(json.dumps(row))
    results["speed"] = rows
    print(f"\n{dev}, median of do_bench, microseconds (speedup vs cuBLAS bf16)\n")
    specs = ["int4:g128", "int3:g128", "int2:g128", "int8:g128", "int4:g128+lowrank:r32"]
    print("| shape (in x out) | batch | bf16 | tinygemm int4 g128 | " + " | ".join(specs) + " | int4 path |")
    print("|---|---|---|---|" + "---|" * len(specs) + "---|")
    for r in rows:
        cells = []
        for s in specs:
            t = r.get(f"{s}_us")
            cells.append("" if t is None else f"{t:.1f} ({r['bf16_us'] / t:.2f}x)")
        tt = r["tinygemm_int4_us"]
        print(f"| {r['shape']} | {r['m']} | {r['bf16_us']:.1f} | {tt:.1f} ({r['bf16_us'] / tt:.2f}x) | "
              + " | ".join(cells) + f" | {r['int4:g128_path'][0]} {list(r['int4:g128_path'][1])} |")
    print(f"\nworst relative error of a fused kernel: {worst:.2e}; failures: {n_fail}; total {time.time() - t0:.0f}s")
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
