"""Compile the "wa" kernel's dispatcher candidates for sm_90 without a GPU (catches Triton front-end failures and
shows registers a thread before spending device time).

    pip download --no-deps triton==3.6.0 -d /tmp/t36whl && unzip -q -o /tmp/t36whl/*.whl -d /tmp/t36
    chmod +x /tmp/t36/triton/backends/nvidia/bin/*
    PYTHONPATH=/tmp/t36:src python bench/wa_compile.py [--shapes 4096x14336,...] [--batches 1,16,64,128] [--regs]

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x28672,28672x8192,11008x4096")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--lowrank", action="store_true", help="also the fused low-rank epilogue")
    ap.add_argument("--regs", action="store_true")
    args = ap.parse_args()
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
