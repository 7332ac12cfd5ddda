"""Does rotating through too few weight copies leave some of them in L2? (GPU)

    python bench/l2_copies.py [--shape 14336x4096] [--batch 64] [--config 64,64,4,4,3,1] [--copies 1,2,3,4,5,8,16]

Times one int4 "wa" config (``ops.wa_mm``) and cuBLAS bf16 with ``bench_graph`` over rotations of 1, 2, ... copies
of the weights. If the time falls with fewer copies, the rotation is partly served from L2 and the benchmark's
copy count (``bench/kernels.py: n_copies``) must grow. Writes ``$OUT/l2_copies_<shape>_b<batch>.json``.
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
    ap.add_argument("--shape", default="14336x4096")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--config", default="64,64,4,4,3,1")
    ap.add_argument("--copies", default="1,2,3,4,5,8,16")
    args = ap.parse_args()
    from kernels import bench_graph
    from wa_probe import make

    from tensorslim.kernels import dispatch, ops

    k, n = (int(v) for v in args.shape.split("x"))
    cfg = [int(v) for v in args.config.split(",")]
    counts = [int(c) for c in args.copies.split(",")]
    lays = [make(args.shape, 4, "cuda", seed=i)[1] for i in range(max(counts))]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(8, max(counts)))]
    x = torch.randn(args.batch, k, device="cuda", dtype=torch.bfloat16)
    meta = dispatch.wa_meta(lays[0])
    nbytes = sum(t.numel() * t.element_size() for t in (lays[0].q, lays[0].scales, lays[0].zeros))
    rows = []
    for c in counts:
        t = bench_graph([lambda L=L: ops.wa_mm(x, L.q, L.scales, L.zeros, None, None, meta, cfg, torch.bfloat16)
                         for L in lays[:c]])
        row = {"copies": c, "rotation_mb": c * nbytes / 1e6, "int4_us": t}
        if c <= len(dense):
            row["bf16_us"] = bench_graph([lambda d=d: torch.nn.functional.linear(x, d) for d in dense[:c]])
            row["bf16_rotation_mb"] = c * n * k * 2 / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"l2_copies_{args.shape}_b{args.batch}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "batch": args.batch, "config": cfg,
                   "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
