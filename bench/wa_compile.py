"""Compile the "wa" kernel's dispatcher candidates for sm_90 without a GPU (catches Triton front-end failures and
shows registers a thread before spending device time).

    pip download --no-deps triton==3.6.0 -d /tmp/t36whl && unzip -q -o /tmp/t36whl/*.whl -d /tmp/t36
    chmod +x /tmp/t36/triton/backends/nvidia/bin/*
    PYTHONPATH=/tmp/t36:src python bench/wa_compile.py [--shapes 4096x14336,...] [--batches 1,16,64,128] [--regs]
    PYTHONPATH=/tmp/t36:src python bench/wa_compile.py --ext   # the MXFP4 / NVFP4 / BCQ3 "wa" and "dequant" kernels

Uses whichever Triton is importable first (above: the device image's 3.6.0). Each distinct compilation (the
constexprs and launch options of a candidate, bf16 activations, group 128 asymmetric, with and without split-K) is
built once; ``--regs`` prints registers and spills from ``cuobjdump -res-usage`` of the cubin.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, "src")


def compile_one(key: tuple, regs: bool) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tensorslim.kernels.triton.wa import wa_kernel

    j, bits, bm, bn, split, warps, stages, half, has_lr = key
    out_t = "*fp32" if split > 1 else "*bf16"
    names = list(wa_kernel.arg_names)
    types = {"x_ptr": "*bf16", "out_ptr": out_t, "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "t_ptr": "*fp32",
             "u_ptr": "*bf16"}
    consts = dict(SYMMETRIC=False, GROUP=128, J=j, HAS_LR=has_lr, BR=32, TCP=8, BM=bm, BN=bn, USE_ASM=True,
                  ATOMIC=split > 1, BITS=bits, HALF=bool(half), PDL=has_lr)  # the Sum runs as a dependent launch
    sig = {}
    for name in names:
        sig[name] = "constexpr" if name in consts else types.get(name, "i32")
    div = [i for i, nm in enumerate(names) if nm in types or nm in ("KW", "stride_xm", "stride_om", "stride_un")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in div}
    src = ASTSource(wa_kernel, sig, consts, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages,
                                                                          "launch_pdl": has_lr})
    if not regs:
        return "ok"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res)
    return f"regs {m.group(1)} stack {m.group(2)} shared {m.group(3)}" if m else res.strip()[:200]


def compile_ext(key: tuple, regs: bool) -> str:
    """One MXFP4 / NVFP4 (``wa_fp4_kernel``) or BCQ (``wa_bcq_kernel``) "wa" compilation: ``key = (kind, j, bm, bn,
    split, warps, stages)``, bf16 activations."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tensorslim.kernels.triton.wa_bcq import wa_bcq_kernel
    from tensorslim.kernels.triton.wa_fp4 import wa_fp4_kernel

    kind, j, bm, bn, split, warps, stages = key
    if kind.startswith("dequant-"):
        return compile_dequant(kind[len("dequant-"):], j)
    out_t = "*fp32" if split > 1 else "*bf16"
    if kind == "bcq3":
        fn = wa_bcq_kernel
        types = {"x_ptr": "*bf16", "out_ptr": out_t, "p_ptr": "*i32", "a_ptr": "*fp32", "c_ptr": "*fp32",
                 "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
        consts = dict(Q=3, GROUP=128, J=j, BM=bm, BN=bn, USE_ASM=True, ATOMIC=split > 1, SERIAL=split > 1)
    else:
        fn = wa_fp4_kernel
        types = {"x_ptr": "*bf16", "out_ptr": out_t, "q_ptr": "*i32", "e_ptr": "*u8", "ws_ptr": "*fp32",
                 "cnt_ptr": "*i32", "post": "fp32"}
        consts = dict(GROUP=16 if kind == "nvfp4" else 32, J=j, BM=bm, BN=bn, USE_ASM=True, ATOMIC=split > 1,
                      SERIAL=split > 1, NV=kind == "nvfp4")
    sig = {nm: "constexpr" if nm in consts else types.get(nm, "i32") for nm in fn.arg_names}
    ck = triton.compile(ASTSource(fn, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": stages})
    staged = ck.asm["ttgir"].count("local_alloc %lo") + ck.asm["ttgir"].count("local_alloc %hi")
    msg = "ok" if not staged else f"decoded tile staged through shared memory ({staged} allocs)"
    return f"{msg}, shared {ck.metadata.shared} B" if regs or staged else msg


def compile_dequant(kind: str, j: int) -> str:
    """The "dequant" kernels of the MXFP4 / NVFP4 / BCQ3 repacks (session 14), bf16 and fp16 outputs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tensorslim.kernels.ops_ext import DEQUANT_BN
    from tensorslim.kernels.triton.wa_ext_dequant import bcq_wa_dequant_kernel, fp4_wa_dequant_kernel

    for out_t in ("*bf16", "*fp16"):
        if kind == "bcq3":
            fn, consts = bcq_wa_dequant_kernel, dict(Q=3, GROUP=128, J=j, BN=DEQUANT_BN)
            types = {"p_ptr": "*i32", "a_ptr": "*fp32", "c_ptr": "*fp32", "out_ptr": out_t}
        else:
            fn = fp4_wa_dequant_kernel
            consts = dict(GROUP=16 if kind == "nvfp4" else 32, J=j, BN=DEQUANT_BN, NV=kind == "nvfp4")
            types = {"q_ptr": "*i32", "e_ptr": "*u8", "out_ptr": out_t, "post": "fp32"}
        sig = {nm: "constexpr" if nm in consts else types.get(nm, "i32") for nm in fn.arg_names}
        triton.compile(ASTSource(fn, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 3})
    return "ok"


def ext_keys(shapes: str, batches: str) -> dict:
    """Distinct "wa" compilations the dispatcher would launch for MXFP4 / NVFP4 / BCQ3 g128 on these shapes."""
    from tensorslim.kernels.dispatch_ext import wa_configs
    from tensorslim.kernels.layout_ext import BCQ_WA_JS, BCQWALayout, FP4WALayout, bcq_wa_block_words, wa_block_words

    keys: dict = {}
    for shape in shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        layouts = []
        if k % 256 == 0:
            layouts.append(("nvfp4", FP4WALayout(n=n, k=k, j=32, group=16, q=None, sc=None, nv=True)))
            j = wa_block_words(k, 32)
            if j:
                layouts.append(("mxfp4", FP4WALayout(n=n, k=k, j=j, group=32, q=None, sc=None)))
        for j in BCQ_WA_JS:  # every block size the layout may pick
            if bcq_wa_block_words(k, 128) and k % (16 * j) == 0:
                layouts.append(("bcq3", BCQWALayout(n=n, k=k, q=3, j=j, group=128, planes=None, a2=None, c=None)))
        for kind, wl in layouts:
            for m in map(int, batches.split(",")):
                for path, cfg in wa_configs(wl, m):
                    if path == "dequant":
                        keys.setdefault(("dequant-" + kind, wl.j, 0, 0, 0, 4, 3), f"{shape} m={m}")
                        continue
                    keys.setdefault((kind, wl.j, cfg[0], cfg[1], min(cfg[2], 2), cfg[3], cfg[4]), f"{shape} m={m}")
    return keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x28672,28672x8192,11008x4096")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--lowrank", action="store_true", help="also the fused low-rank epilogue")
    ap.add_argument("--regs", action="store_true")
    ap.add_argument("--ext", action="store_true", help="the MXFP4 / NVFP4 / BCQ3 'wa' kernels instead (session 13); "
                    "also flags a decoded tile staged through shared memory")
    args = ap.parse_args()
    if args.ext:
        import triton

        keys = ext_keys(args.shapes, args.batches)
        print(f"triton {triton.__version__}: {len(keys)} distinct compilations", flush=True)
        fails = 0
        for key, where in sorted(keys.items()):
            try:
                msg = compile_ext(key, args.regs)
            except Exception as e:
                msg = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            fails += not msg.startswith("ok")
            if args.regs or not msg.startswith("ok"):
                print(f"  {key[0]} j={key[1]} BM={key[2]} BN={key[3]} split={'>1' if key[4] > 1 else 1} "
                      f"warps={key[5]} stages={key[6]} ({where}): {msg}", flush=True)
        print(f"{fails} failed", flush=True)
        sys.exit(1 if fails else 0)
    import torch

    import triton

    from tensorslim.kernels import dispatch
    from tensorslim.kernels.layout import IntKernelLayout, wa_block_words

    keys = {}
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        j = wa_block_words(k, 128)
        for bits in map(int, args.bits.split(",")):
            two = bits == 3  # a 2-bit and a 1-bit plane
            lay = IntKernelLayout(n=n, k=k, bits=bits, bits_a=2 if two else bits, bits_b=1 if two else 0, group=128,
                                  symmetric=False, qa=torch.empty(0), qb=torch.empty(0) if two else None,
                                  scales=torch.empty(0), zeros=torch.empty(0), perm=None)
            for m in map(int, args.batches.split(",")):
                for path, cfg in dispatch.candidates(lay, m):
                    if path != "wa":
                        continue
                    half = cfg[5] if len(cfg) > 5 else 0
                    for lr in (False, True) if args.lowrank else (False,):
                        key = (j, bits, cfg[0], cfg[1], min(cfg[2], 2), cfg[3], cfg[4], half, lr)
                        keys.setdefault(key, f"{shape} m={m}")
    print(f"triton {triton.__version__}: {len(keys)} distinct compilations", flush=True)
    fails = 0
    for key, where in sorted(keys.items()):
        try:
            msg = compile_one(key, args.regs)
        except Exception as e:  # report every failure, then exit non-zero
            fails += 1
            msg = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if args.regs or msg != "ok":
            print(f"  j={key[0]} bits={key[1]} BM={key[2]} BN={key[3]} split={'>1' if key[4] > 1 else 1} "
                  f"warps={key[5]} stages={key[6]} half={key[7]} lr={key[8]} ({where}): {msg}", flush=True)
    if args.lowrank:  # the t = x V^T partial-sums kernel of the fused Sum
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from tensorslim.kernels.triton.lowrank_t import lowrank_t_kernel

        names = list(lowrank_t_kernel.arg_names)
        consts = dict(P=2, BM=16, BR=32, BK=64, PDL=True)  # fp16 factors as two bf16 parts
        types = {"x_ptr": "*bf16", "v_ptr": "*bf16", "tp_ptr": "*fp32"}
        sig = {nm: "constexpr" if nm in consts else types.get(nm, "i32") for nm in names}
        try:
            triton.compile(ASTSource(lowrank_t_kernel, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "num_stages": 3, "launch_pdl": True})
        except Exception as e:
            fails += 1
            print(f"  lowrank_t: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    print(f"{fails} failed", flush=True)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
