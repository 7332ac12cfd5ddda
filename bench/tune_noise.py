"""How repeatable is the dispatcher's tuner? (GPU only.)

    python bench/tune_noise.py [--pairs 28672x8192:1,...] [--runs 3]

For each ``shape:batch`` (int4 g128), runs :func:`tensorslim.kernels.dispatch.tune` ``--runs`` times as shipped
(``warm_each=0``, 5 replays) and ``--runs`` times with 20 ms of replays before every candidate and 9 replays. It
prints each run's choice and the tuner's own time for it, then times every distinct choice again with
``bench_graph`` (0.3 s warm-up, 30 replays), so a choice can be judged by what it costs, not by what the tuner saw.
Writes ``$OUT/tune_noise.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, "src")
sys.path.insert(0, "bench")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="28672x8192:1,8192x28672:1,14336x4096:1,4096x14336:1,8192x28672:16,"
                                       "28672x8192:16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=14, help="processes pre-compiling the candidates (0: none)")
    ap.add_argument("--top", type=int, default=0, help="also time the tuner's K fastest candidates (of its first "
                    "shipped run) with bench_graph: does its ranking match what the candidates cost?")
    args = ap.parse_args()
    from kernels import bench_graph, make_int, n_copies, prewarm

    pairs = [(p.split(":")[0], int(p.split(":")[1])) for p in args.pairs.split(",")]
    if args.jobs:
        prewarm([(*(int(v) for v in sh.split("x")), "int4:g128", [m]) for sh, m in pairs], args.jobs)

    from tensorslim.kernels import dispatch

    out = []
    for shape, m in pairs:
        pair = f"{shape}:{m}"
        k, n = (int(v) for v in shape.split("x"))
        cws = [make_int(k, n, "int4:g128", seed=i)[1] for i in range(n_copies(n * k // 2))]
        lay = dispatch.layout(cws[0])
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        runs = []
        first: list = []
        for mode, kw in (("shipped", {}), ("warm20ms_reps9", {"warm_each": 0.02, "reps": 9})):
            for _ in range(args.runs):
                t: list = []
                c = dispatch.tune(lay, m, torch.bfloat16, timings=t, **kw)
                first = first or sorted(t, key=lambda v: v[0])
                runs.append({"mode": mode, "choice": [c[0], list(c[1])], "tuner_us": 1e3 * min(v for v, _ in t),
                             "candidates": len(t)})
        real = {}
        for r in runs:
            key = (r["choice"][0], tuple(r["choice"][1]))
            if key not in real:
                real[key] = bench_graph([lambda cw=cw, key=key: dispatch.kernel_linear(cw, x, choice=key)
                                         for cw in cws])
            r["bench_us"] = real[key]
            print(f"{pair} {r['mode']:15s} {r['choice']} tuner {r['tuner_us']:.1f} us, bench {r['bench_us']:.1f} us "
                  f"({r['candidates']} candidates)", flush=True)
        top = []
        for ms, c in first[:args.top]:  # the tuner's ranking against bench_graph's
            us = bench_graph([lambda cw=cw, c=c: dispatch.kernel_linear(cw, x, choice=c) for cw in cws])
            top.append({"choice": [c[0], list(c[1])], "tuner_us": 1e3 * ms, "bench_us": us})
            print(f"{pair} top {c}: tuner {1e3 * ms:.1f} us, bench {us:.1f} us", flush=True)
        out.append({"pair": pair, "runs": runs, "top": top})
    path = os.path.join(os.environ.get("OUT") or "runs", "tune_noise.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": out}, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
