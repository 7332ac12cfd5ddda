"""Fused ``Sum(int4 g128, rank 32)`` on "wa" with and without programmatic dependent launch, against plain int4, in
one run (GPU only, Hopper+ for PDL).

    python bench/sum_pdl.py [--shapes 4096x14336,8192x28672,28672x8192] [--batches 1,16]

For each (shape, batch) the dispatcher tunes plain int4 once; that "wa" config then runs three ways, each a
CUDA-graph replay over rotating weight copies (cold L2), median microseconds: plain int4; the Sum with ``lowrank_t``
then "wa" as two ordinary launches; the Sum as :func:`tensorslim.kernels.ops.wa_mm` runs it (``lowrank_t`` lets
"wa" launch at once, "wa" waits for it only in its epilogue). The PDL result, replayed in the graph, is checked
against ``x @ decode()^T`` in fp32 (relative error <= 1e-3). Writes ``$OUT/sum_pdl.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, "src")
sys.path.insert(0, "bench")

import torch  # noqa: E402

from kernels import bench_graph, make_int, make_lowrank, n_copies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,8192x28672,28672x8192")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--config", default="", help="a fixed wa config BM,BN,SPLIT_K,warps,stages[,half] (no tuning)")
    ap.add_argument("--chunks", default="", help="also the PDL Sum with lowrank_t programs of these many inputs, "
                    "e.g. 256,512 (the shipped default: ops.lowrank_chunks)")
    args = ap.parse_args()
    from tensorslim.formats import SumWeight, parse_format
    from tensorslim.kernels import dispatch, ops
    from tensorslim.kernels.reference import reference_fp32, relative_error

    dev = torch.cuda.get_device_name()
    print(dev, torch.__version__, "PDL" if ops.pdl_ok(torch.empty(1, device="cuda")) else "no PDL", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        copies = []
        for i in range(n_copies(n * k // 2)):
            base = make_int(k, n, "int4:g128", seed=i)[1]
            sw = SumWeight(format=parse_format("int4:g128+lowrank:r32"), shape=(n, k), base=base,
                           extra=make_lowrank(k, n, 32, seed=100 + i))
            copies.append(sw)
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            lay0 = dispatch.layout(copies[0].base)
            path, cfg = ("wa", [int(v) for v in args.config.split(",")]) if args.config else \
                dispatch.tuned_choice(lay0, x, None)
            if path != "wa":
                print(f"{shape} m={m}: tuned path {path}, not wa; skipped", flush=True)
                continue
            cfg = list(cfg)

            def plain(sw):
                wl = dispatch.wa_of(dispatch.layout(sw.base))
                return ops.wa_mm(x, wl.q, wl.scales, wl.zeros, None, None, dispatch.wa_meta(wl), cfg, x.dtype)

            def two_launches(sw):
                wl = dispatch.wa_of(dispatch.layout(sw.base))
                vp = dispatch.v_parts(sw.extra, x.dtype)

                def run(xc, out):
                    t = ops.launch_lowrank_t(xc, vp, False)
                    ops.launch_wa(xc, wl.q, wl.scales, wl.zeros, t, sw.extra.u, dispatch.wa_meta(wl), cfg, out, False)
                return ops._into_new(x, n, cfg[2], x.dtype, run)

            def fused(sw, out_dtype=x.dtype):
                wl = dispatch.wa_of(dispatch.layout(sw.base))
                return ops.wa_mm(x, wl.q, wl.scales, wl.zeros, dispatch.v_parts(sw.extra, x.dtype), sw.extra.u,
                                 dispatch.wa_meta(wl), cfg, out_dtype)

            pre_t = {id(sw): ops.launch_lowrank_t(x.contiguous(), dispatch.v_parts(sw.extra, x.dtype))
                     for sw in copies}

            def epilogue_only(sw):  # t computed before, outside the timing: what the epilogue alone costs
                wl = dispatch.wa_of(dispatch.layout(sw.base))

                def run(xc, out):
                    ops.launch_wa(xc, wl.q, wl.scales, wl.zeros, pre_t[id(sw)], sw.extra.u, dispatch.wa_meta(wl), cfg,
                                  out, False)
                return ops._into_new(x, n, cfg[2], x.dtype, run)

            def epilogue_masked(sw):  # the epilogue's code, with R = 0: every load of U and t masked off
                import triton

                wl = dispatch.wa_of(dispatch.layout(sw.base))
                tt, u = pre_t[id(sw)], sw.extra.u
                blocks = k // (8 * wl.j)

                def run(xc, out):
                    ops.wa_kernel[(triton.cdiv(m, cfg[0]), triton.cdiv(n, cfg[1]), cfg[2])](
                        xc, out, wl.q, wl.scales, wl.zeros, tt, u, m, n, k // 8, blocks, -(-blocks // cfg[2]), k // 128,
                        0, tt.shape[0], xc.stride(0), out.stride(0), tt.stride(0), tt.stride(1), u.stride(0),
                        SYMMETRIC=False, GROUP=128, J=wl.j, HAS_LR=True, BR=32, TCP=ops._next_pow2(tt.shape[0]),
                        BM=cfg[0], BN=cfg[1], USE_ASM=True, ATOMIC=cfg[2] > 1, BITS=4, HALF=bool(cfg[5]),
                        num_warps=cfg[3], num_stages=cfg[4])
                return ops._into_new(x, n, cfg[2], x.dtype, run)

            def lowrank_t_only(sw):
                return ops.launch_lowrank_t(x.contiguous(), dispatch.v_parts(sw.extra, x.dtype))

            def fused_chunk(sw, chunk):
                wl = dispatch.wa_of(dispatch.layout(sw.base))
                vp = dispatch.v_parts(sw.extra, x.dtype)

                def run(xc, out):
                    t = ops.launch_lowrank_t(xc, vp, True, chunk)
                    ops.launch_wa(xc, wl.q, wl.scales, wl.zeros, t, sw.extra.u, dispatch.wa_meta(wl), cfg, out, True)
                return ops._into_new(x, n, cfg[2], x.dtype, run)

            modes = [("int4", plain), ("sum_two_launches", two_launches), ("sum_pdl", fused),
                     ("sum_epilogue_only", epilogue_only), ("sum_epilogue_masked", epilogue_masked),
                     ("lowrank_t_only", lowrank_t_only)]
            modes += [(f"sum_pdl_chunk{c}", lambda sw, c=int(c): fused_chunk(sw, c))
                      for c in args.chunks.split(",") if c]
            res = {}
            for name, fn in modes:
                res[name] = bench_graph([lambda sw=sw, fn=fn: fn(sw) for sw in copies])
            # correctness of the PDL form inside a captured graph (fp32 output: no bf16 rounding in the check)
            outs = []
            g = torch.cuda.CUDAGraph()
            fused(copies[0], torch.float32)
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                outs.append(fused(copies[0], torch.float32))
            g.replay()
            torch.cuda.synchronize()
            err = relative_error(outs[0].float(), reference_fp32(copies[0], x))
            row = {"shape": shape, "m": m, "config": cfg, **{f"{k_}_us": v for k_, v in res.items()}, "err": err}
            rows.append(row)
            print(f"{shape} m={m} wa {cfg}: int4 {res['int4']:.1f} us, Sum two launches {res['sum_two_launches']:.1f}"
                  f" (+{100 * (res['sum_two_launches'] / res['int4'] - 1):.0f}%), Sum PDL {res['sum_pdl']:.1f} "
                  f"(+{100 * (res['sum_pdl'] / res['int4'] - 1):.0f}%), epilogue only {res['sum_epilogue_only']:.1f}, "
                  f"lowrank_t alone {res['lowrank_t_only']:.1f}; PDL graph replay rel err {err:.1e}",
                  flush=True)
            print("  " + ", ".join(f"{k_} {v:.1f}" for k_, v in res.items()), flush=True)
            assert err <= 1e-3, err
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sum_pdl.json.tmp"), "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "rows": rows}, f, indent=1)
    os.replace(os.path.join(out_dir, "sum_pdl.json.tmp"), os.path.join(out_dir, "sum_pdl.json"))


if __name__ == "__main__":
    main()
