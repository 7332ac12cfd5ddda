"""Split-K in "wa": the serial workspace reduction (what ``ops.wa_mm`` runs since session 10) against the atomic adds
into a zeroed fp32 output converted afterwards (before), same configs, same weights, alternating (GPU).

    python bench/splitk_serial.py [--cases 14336x4096:1:8,64,4,4,3,0;...] [--rounds 3]

Both are checked against ``x @ decode()^T`` in fp32 first. Times: CUDA-graph replays over rotating weight copies
(cold L2), median microseconds per call, each path timed ``--rounds`` times in alternation; the table gives the
medians. Writes ``$OUT/splitk_serial.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, "src")
sys.path.insert(0, "bench")

import torch  # noqa: E402

CASES = ("14336x4096:1:8,64,4,4,3,0;14336x4096:1:8,32,4,2,3,0;14336x4096:16:16,32,4,2,3,0;"
         "14336x4096:16:16,64,8,4,2,0;14336x4096:64:64,64,4,4,3,1;28672x8192:1:8,64,2,4,4,0;"
         "28672x8192:1:8,128,4,8,3,0;28672x8192:16:16,64,4,4,2,0;28672x8192:16:16,32,2,2,3,0;"
         "11008x4096:1:8,64,4,4,3,0;11008x4096:1:8,32,2,2,3,0;4096x4096:1:8,32,2,2,3,0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=CASES, help="shape:batch:BM,BN,split,warps,stages,half;...")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from kernels import bench_graph, n_copies
    from wa_probe import make

    from tensorslim.kernels import dispatch, ops
    from tensorslim.kernels.reference import relative_error

    rows = []
    made: dict = {}
    for case in args.cases.split(";"):
        shape, m, cfg = case.split(":")
        m, cfg = int(m), [int(v) for v in cfg.split(",")]
        k, n = (int(v) for v in shape.split("x"))
        if shape not in made:
            made.clear()
            made[shape] = [make(shape, 4, "cuda", seed=i) for i in range(n_copies(n * k // 2))]
        w, lay = made[shape][0]
        lays = [c[1] for c in made[shape]]
        meta = dispatch.wa_meta(lay)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.decode().float().t()

        def serial(L):
            return ops.wa_mm(x, L.q, L.scales, L.zeros, None, None, meta, cfg, torch.bfloat16)

        def atomic(L):
            out = torch.zeros(m, n, device="cuda", dtype=torch.float32)
            ops.launch_wa(x, L.q, L.scales, L.zeros, None, None, meta, cfg, out)
            return out.to(torch.bfloat16)

        ws = [c[0] for c in made[shape]]

        def dispatched(i):  # the same config through dispatch.kernel_linear, as bench/kernels.py times it
            return dispatch.kernel_linear(ws[i], x, choice=("wa", tuple(cfg)))

        row = {"case": case, "err_serial": relative_error(serial(lay), ref),
               "err_atomic": relative_error(atomic(lay), ref)}
        times: dict = {"serial": [], "atomic": [], "kernel_linear": []}
        for _ in range(args.rounds):
            for name, fn in (("serial", serial), ("atomic", atomic)):
                times[name].append(bench_graph([lambda L=L, fn=fn: fn(L) for L in lays]))
            times["kernel_linear"].append(bench_graph([lambda i=i: dispatched(i) for i in range(len(ws))]))
        row.update({f"{k}_us": statistics.median(v) for k, v in times.items()}, rounds=times)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
        rows.append(row)
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "splitk_serial.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print("\n| case | atomic + fill + convert (us) | serial (us) | change | serial via kernel_linear (us) |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['atomic_us']:.1f} | {r['serial_us']:.1f} | "
              f"{100 * (r['serial_us'] / r['atomic_us'] - 1):+.0f}% | {r['kernel_linear_us']:.1f} |")


if __name__ == "__main__":
    main()
