"""How fast can the H100 stream int4 weight words with the "wa" kernel's grid and tiles, with no math at all?
(GPU only; Gluon.)

    python bench/bw_probe.py [--shape 8192x28672] [--cases BN:warps:stages:tiled:xcopy,...]

A diagnostic for issue 7's batch-1 gap: the shipped int4 kernel reaches ~72% of the H100's DRAM bandwidth
(docs/results/kernels.md), cuBLAS bf16 ~86%. Each case here runs the same memory pipeline as ``bench/gluon_wa.py``
(a ring of ``stages`` shared-memory stages filled by ``cp.async``; programs of ``BN`` rows, every program streaming
its rows' words block by block) but replaces the dequantization and the dots with an integer sum of the words, so
its time is what the memory side alone allows. Variants:
- ``tiled`` 0: the words as "wa" stores them, ``[N, K/8]`` row-major: a stage is ``BN`` runs of 256 bytes, 4 KB
  apart; 1: each stage's tile contiguous (``BN * 256`` bytes in one run), a layout the packer could produce;
- ``xcopy`` 1: also copy the ``[8, 512]`` bf16 activation tile of each stage (row 0 real, rows 1-7 zero-filled), as
  "wa" does at batch 1.

Also times a device-to-device copy of the words (read + write) for the practical bandwidth. The sum of each program
is checked against PyTorch's (the copies really happened). Writes ``$OUT/bw_probe_<shape>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, "src")
sys.path.insert(0, "bench")

import torch  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: E402

_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

CASES = ["32:2:2:0:1", "32:2:2:0:0", "32:2:3:0:1", "32:2:3:0:0", "32:2:4:0:0", "32:2:6:0:0",
         "32:2:2:1:0", "32:2:3:1:0", "32:2:4:1:0", "32:2:6:1:0", "32:2:3:1:1",
         "64:4:2:0:0", "64:4:3:0:0", "64:4:4:0:0", "64:4:3:1:0", "64:4:4:1:0",
         "16:1:4:0:0", "16:1:4:1:0", "16:1:8:1:0", "128:4:3:1:0", "128:4:4:1:0"]


@gluon.jit
def _issue(w_smem, x_smem, q_ptr, x_ptr, pid, i, stage, valid, r, c, rx, cx, NB, KW,
           BN: gl.constexpr, WPS: gl.constexpr, XS: gl.constexpr, TILED: gl.constexpr, XCOPY: gl.constexpr):
    if TILED:
        off = (pid.to(gl.int64) * NB + i) * (BN * WPS) + (r * WPS)[:, None] + c[None, :]
    else:
        off = ((pid * BN + r).to(gl.int64) * KW)[:, None] + (i * WPS + c)[None, :]
    _cp_async(w_smem.index(stage), q_ptr + off, mask=(r < BN)[:, None] & valid)
    if XCOPY:
        _cp_async(x_smem.index(stage), x_ptr + (rx * 0)[:, None] + (i * XS + cx)[None, :],
                  mask=(rx < 1)[:, None] & valid)


@gluon.jit
def stream_kernel(q_ptr, x_ptr, out_ptr, KW, NB, BN: gl.constexpr, WPS: gl.constexpr, S: gl.constexpr,
                  TILED: gl.constexpr, XCOPY: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    XS: gl.constexpr = WPS * 8
    wcp: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (WPS // 4), WPS // 4], [NW, 1], [1, 0])
    xcp: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])
    w_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    x_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    w_smem = gl.allocate_shared_memory(gl.int32, [S, BN, WPS], w_sl)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [S, 8, XS], x_sl)
    pid = gl.program_id(0)
    r = gl.arange(0, BN, layout=gl.SliceLayout(1, wcp))
    c = gl.arange(0, WPS, layout=gl.SliceLayout(0, wcp))
    rx = gl.arange(0, 8, layout=gl.SliceLayout(1, xcp))
    cx = gl.arange(0, XS, layout=gl.SliceLayout(0, xcp))
    for i in gl.static_range(S - 1):
        _issue(w_smem, x_smem, q_ptr, x_ptr, pid, i, i, i < NB, r, c, rx, cx, NB, KW, BN, WPS, XS, TILED, XCOPY)
        async_copy.commit_group()
    acc = gl.zeros([BN, WPS], gl.int32, layout=wcp)
    for it in range(0, NB):
        _barrier()
        nxt = it + S - 1
        _issue(w_smem, x_smem, q_ptr, x_ptr, pid, nxt, nxt % S, nxt < NB, r, c, rx, cx, NB, KW, BN, WPS, XS, TILED,
               XCOPY)
        async_copy.commit_group()
        async_copy.wait_group(S - 1)
        _barrier()
        acc = acc + w_smem.index(it % S).load(wcp)
    async_copy.wait_group(0)
    gl.store(out_ptr + pid, gl.sum(gl.sum(acc, 1), 0))


def parse(case: str) -> tuple[int, int, int, int, int]:
    return tuple(int(v) for v in case.split(":"))  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x28672")
    ap.add_argument("--cases", default=",".join(CASES), help="BN:warps:stages:tiled:xcopy,...")
    args = ap.parse_args()
    from kernels import bench_graph, n_copies

    k, n = (int(v) for v in args.shape.split("x"))
    kw, wps = k // 8, 64
    nb = kw // wps
    nbytes = n * kw * 4
    copies = [torch.randint(-2**31, 2**31 - 1, (n, kw), device="cuda", dtype=torch.int32)
              for _ in range(n_copies(nbytes))]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    results = {"device": torch.cuda.get_device_name(), "shape": args.shape, "word_bytes": nbytes, "cases": []}
    dst = [torch.empty_like(q) for q in copies[:2]]
    t = bench_graph([lambda q=q, d=dst[i % 2]: d.copy_(q) for i, q in enumerate(copies)])
    results["copy_us"] = t
    results["copy_read_plus_write_tb_s"] = 2 * nbytes / t / 1e6
    print(f"d2d copy of {nbytes / 1e6:.1f} MB: {t:.1f} us, {2 * nbytes / t / 1e6:.2f} TB/s read+write", flush=True)
    for case in args.cases.split(","):
        bn, warps, stages, tiled, xcopy = parse(case)
        row = {"case": case}
        try:
            out = torch.zeros(n // bn, device="cuda", dtype=torch.int32)

            def go(q, o=out, bn=bn, warps=warps, stages=stages, tiled=tiled, xcopy=xcopy):
                stream_kernel[(n // bn,)](q, x, o, kw, nb, BN=bn, WPS=wps, S=stages, TILED=bool(tiled),
                                          XCOPY=bool(xcopy), num_warps=warps)
                return o

            go(copies[0])
            torch.cuda.synchronize()
            # the words each program read, in its pattern: tiled = consecutive [BN * 64]-word tiles
            q0 = copies[0]
            want = (q0.view(-1).view(n // bn, -1) if tiled else q0.view(n // bn, bn * kw)).sum(1, dtype=torch.int64)
            row["sum_ok"] = bool(((want & 0xFFFFFFFF) == (out.to(torch.int64) & 0xFFFFFFFF)).all())
            us = bench_graph([lambda q=q: go(q) for q in copies])
            row.update(us=us, tb_s=nbytes / us / 1e6)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        results["cases"].append(row)
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bw_probe_{args.shape}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
