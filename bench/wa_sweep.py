"""Sweep the weights-as-A int4 kernel's configs on the issue-7 shapes against cuBLAS bf16 and tinygemm (GPU only).

    python bench/wa_sweep.py [--shapes 4096x14336,...] [--batches 1,16,64,128] [--pairs 8192x28672:1,...]
                             [--js 64] [--sym] [--jobs 12] [--wide]

Every config is checked against ``x @ decode()^T`` in fp32 (NaN-poisoned output, relative error <= 1e-3) before it
is timed; times are CUDA-graph replays over rotating weight copies (cold L2), median, microseconds, with split-K's
zeroing and final cast included. Prints the best configs per (shape, batch) and writes ``$OUT/wa_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, "src")
sys.path.insert(0, "bench")

import torch  # noqa: E402

from kernels import bench_graph, n_copies, tinygemm_fns  # noqa: E402


# ``--wide``: (BM, BN, warps, stages, half) sets beyond the dispatcher's, each with splits 1, 2, 4 and 8. Chosen from
# local sm_90 builds (Triton 3.6, ``bench/wa_compile.py``-style): no spill stack, J = 64.
WIDE = [(32, 64, 4, 3, 1), (32, 128, 8, 3, 1), (32, 128, 8, 4, 1), (32, 256, 16, 3, 1), (64, 64, 4, 3, 1),
        (64, 64, 4, 4, 1), (64, 128, 8, 2, 1), (64, 128, 8, 3, 1), (64, 128, 8, 4, 1), (64, 256, 16, 2, 1),
        (64, 256, 16, 3, 1), (128, 64, 4, 2, 1), (128, 64, 4, 3, 1), (128, 128, 8, 2, 1)]


def configs(m: int, k: int, n: int, sms: int, js=(64, 32), wide: bool = False) -> list[tuple[int, list[int]]]:
    """(j, [BM, BN, SPLIT_K, warps, stages, half]) candidates for ``m`` rows: the dispatcher's, for each layout ``j``
    that fits ``k``; with ``wide`` also the :data:`WIDE` sets whose BM fits ``m``, at splits 1, 2, 4 and 8."""
    from tensorslim.kernels.dispatch import wa_candidates

    out = [(j, list(c)) for j in js if k % (8 * j) == 0 for c in wa_candidates(n, k, 4, j, m, sms)]
    for j in (j for j in js if wide and k % (8 * j) == 0):
        for bm, bn, warps, stages, half in WIDE:
            for split in (s for s in (1, 2, 4, 8) if bm <= max(32, m) and k // (8 * j) // s >= 2):
                c = (j, [bm, bn, split, warps, stages, half])
                if c not in out:
                    out.append(c)
    return out


def _warm(task) -> str | None:
    """Compile one config in a worker process (fills Triton's disk cache for the timing process)."""
    shape, m, sym, j, cfg = task
    import torch
    from tensorslim.kernels import ops

    k, n = (int(v) for v in shape.split("x"))
    try:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32)
        s = torch.rand(n, k // 128, device="cuda", dtype=torch.float16)
        z = None if sym else torch.randint(0, 16, (n, k // 128), device="cuda", dtype=torch.uint8)
        out = torch.zeros(m, n, device="cuda", dtype=torch.float32 if cfg[2] > 1 else torch.bfloat16)
        ops.launch_wa(x, q, s, z, None, None, [k, 128, int(sym), j], cfg, out)
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:160]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x28672,28672x8192")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling configs before the timing pass")
    ap.add_argument("--js", default="64", help="words a row per block of the layouts to sweep")
    ap.add_argument("--pairs", default="", help="shape:batch pairs instead of shapes x batches")
    ap.add_argument("--wide", action="store_true", help="also the WIDE config sets at splits 1-8 (64+ rows)")
    args = ap.parse_args()
    from tensorslim.formats import IntGroup, quantize_rtn
    from tensorslim.kernels import dispatch, ops
    from tensorslim.kernels.layout import wa_layout
    from tensorslim.kernels.reference import relative_error

    dev = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(dev, torch.__version__, flush=True)
    results = []
    t0 = time.time()
    js = [int(v) for v in args.js.split(",")]
    pairs = [(sh, m) for sh in args.shapes.split(",") for m in map(int, args.batches.split(","))]
    if args.pairs:
        pairs = [(p.split(":")[0], int(p.split(":")[1])) for p in args.pairs.split(",")]
    tasks = [(shape, m, args.sym, j, cfg) for shape, m in pairs
             for j, cfg in configs(m, *(int(v) for v in shape.split("x")), sms, js, args.wide)]
    # one compile per specialization: Triton keys on the constexprs, M == 1, and split-K (fp32 atomics) or not
    distinct = {(t[1] == 1, t[3], tuple(t[4][:2]), t[4][2] > 1, *t[4][3:]): t for t in tasks}
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.jobs) as pool:
        errs = pool.map(_warm, list(distinct.values()), chunksize=1)
    bad_keys = {key: e for key, e in zip(distinct, errs) if e}
    failed = {(t[0], t[1], t[3], tuple(t[4])): bad_keys[key] for t in tasks
              if (key := (t[1] == 1, t[3], tuple(t[4][:2]), t[4][2] > 1, *t[4][3:])) in bad_keys}
    print(f"compiled {len(distinct)} distinct configs ({len(tasks)} tasks) in {time.time() - t0:.0f} s, "
          f"{len(failed)} tasks failed {sorted(set(failed.values()))[:3]}", flush=True)
    path = os.path.join(os.environ.get("OUT", "runs"), "wa_sweep.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for shape in dict.fromkeys(p[0] for p in pairs):
        k, n = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        w = quantize_rtn(torch.randn(n, k, device="cuda", generator=g) * 0.02,
                         IntGroup(bits=4, group_size=128, symmetric=args.sym))
        dec = w.decode().float()
        others = [quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, IntGroup(bits=4, group_size=128,
                                                                                  symmetric=args.sym))
                  for _ in range(n_copies(n * k // 2) - 1)]
        lays = {j: [wa_layout(dispatch.layout(v), j) for v in [w] + others] for j in js}
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        for m in (p[1] for p in pairs if p[0] == shape):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ dec.t()
            t_bf16 = bench_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])
            t_tiny = bench_graph(tinygemm_fns(n, k, x, n_copies(n * k // 2), 128)) if m <= 16 else None
            rows = []
            for j, cfg in configs(m, k, n, sms, js, args.wide):
                if (shape, m, j, tuple(cfg)) in failed:
                    continue
                split = cfg[2]

                def call(L, cfg=cfg):  # the dispatcher's op: split-K's zeroing and cast included
                    return ops.wa_mm(x, L.q, L.scales, L.zeros, None, None, dispatch.wa_meta(L), cfg, torch.bfloat16)

                try:
                    lay = lays[j][0]
                    chk = torch.full((m, n), float("nan"), device="cuda") if split == 1 else \
                        torch.zeros(m, n, device="cuda")
                    ops.launch_wa(x, lay.q, lay.scales, lay.zeros, None, None, dispatch.wa_meta(lay), cfg, chk)
                    err = relative_error(chk, ref)
                    us = bench_graph([lambda L=L: call(L) for L in lays[j]])
                except Exception as e:  # compile / shared-memory limits
                    print(f"  {shape} m={m} {cfg}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                rows.append({"j": j, "config": cfg, "us": us, "err": err})
            rows.sort(key=lambda r: r["us"])
            bad = [r for r in rows if not r["err"] <= 1e-3]
            best = rows[0] if rows else None
            tiny = f"{t_tiny:.1f} ({t_bf16 / t_tiny:.2f}x)" if t_tiny else "-"
            print(f"{shape} m={m}: bf16 {t_bf16:.1f} us, tinygemm {tiny}, wa best {best['us']:.1f} us "
                  f"({t_bf16 / best['us']:.2f}x) j{best['j']} {best['config']} err {best['err']:.1e}; "
                  f"{len(rows)} configs, {len(bad)} over 1e-3; [{time.time() - t0:.0f} s]", flush=True)
            for r in rows[1:6]:
                print(f"    {r['us']:.1f} us j{r['j']} {r['config']}", flush=True)
            results.append({"shape": shape, "m": m, "bf16_us": t_bf16, "tiny_us": t_tiny, "rows": rows,
                            "bad": len(bad)})
            with open(path + ".tmp", "w") as f:  # after every pair: a run cut short keeps what it measured
                json.dump({"device": dev, "torch": torch.__version__, "results": results}, f, indent=1)
            os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
