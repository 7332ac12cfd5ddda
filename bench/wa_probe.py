"""Probe what limits the weights-as-A kernel: time source variants of it side by side (GPU; CPU interpreter for a
smoke test with ``--cpu``).

    python bench/wa_probe.py [--jobs 12] [--cpu]

Variants (each a patched copy of :mod:`tensorslim.kernels.triton.wa`, written to a temporary module):
- ``base``: the kernel as shipped.
- ``nozp``: the zero-point subtraction (one ``HADD2`` per code pair) removed. **Wrong results; timing only**: an upper
  bound on what folding the zero point out of the inner loop can gain.
- ``zfold``: the zero point folded out of the inner loop, correctly: the dots accumulate ``x (c + q)`` and each group
  subtracts ``(c + z) X_g`` with ``X_g`` the group's sum of ``x`` (fp32, computed before the call by PyTorch and
  included in the timing).
- ``chain``: each launch is the programmatic dependent of the one before (``launch_pdl``); the programs let the next
  grid start at once and wait for the previous one before reading anything, so a grid's ramp-up overlaps the tail of
  the grid before it.
- ``regpf``: the full-block loop (``HALF = 0``) loads the *next* block's weight words into registers at the top of
  each iteration (a loop-carried prefetch, issued before any of the iteration's math), instead of leaving the
  prefetch to Triton's pipeliner, which issues its ``cp.async`` after the iteration's last activation-tile read.
- ``tma``: int4 weight tiles loaded through TMA (a host-side ``TensorDescriptor`` of the words in place of
  ``q_ptr``): async bulk copies with mbarriers instead of ``cp.async``, fewer registers (104-106 against 138).

Every variant except ``nozp`` is checked against ``x @ decode()^T`` in fp32. Times: CUDA-graph replays over rotating
weight copies (cold L2), median microseconds per call, next to cuBLAS bf16 in the same run. Writes
``$OUT/wa_probe.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, "src")
sys.path.insert(0, "bench")

import torch  # noqa: E402

CASES = [  # (shape in x out, batch, bits, configs)
    ("8192x28672", 1, 4, [[8, 32, 1, 2, 2, 0], [8, 64, 1, 4, 3, 0]]),
    ("28672x8192", 1, 4, [[8, 64, 2, 4, 3, 0], [16, 64, 4, 4, 2, 0]]),
    ("4096x14336", 1, 4, [[8, 32, 1, 2, 3, 0], [8, 64, 1, 4, 3, 0]]),
    ("14336x4096", 1, 4, [[8, 64, 4, 4, 3, 0]]),
    ("8192x28672", 16, 4, [[16, 32, 1, 2, 3, 0], [16, 64, 2, 4, 2, 0]]),
    ("28672x8192", 16, 4, [[16, 64, 4, 4, 2, 0]]),
    ("4096x14336", 16, 4, [[16, 64, 1, 4, 3, 0]]),
    ("8192x28672", 1, 2, [[8, 32, 1, 2, 2, 0], [8, 64, 1, 4, 3, 0]]),
    ("8192x28672", 1, 3, [[8, 32, 1, 2, 2, 0], [8, 64, 1, 4, 3, 0]]),
]
CPU_CASES = [("512x96", 3, b, [[8, 32, 1, 2, 2, 0], [16, 32, 2, 2, 2, 0]]) for b in (4, 3, 2)]
VARIANTS = ("base", "nozp", "zfold", "zsum", "chain", "tma", "regpf")


def patched_source(variant: str) -> str:
    import tensorslim.kernels.triton.wa as wa

    src = open(wa.__file__).read().replace("from .gdc import gdc_wait",
                                           "from tensorslim.kernels.triton.gdc import gdc_wait, gdc_launch_dependents")
    if variant in ("nozp", "zfold", "zsum"):
        for z in ("z_lo", "z_hi"):
            n = src.count(f" - {z}[:, None]")
            assert n >= 2, (variant, z, n)
            src = src.replace(f" - {z}[:, None]", "")
    if variant == "zfold":
        old = "acc += p_lo * s_lo[:, None] + p_hi * s_hi[:, None]"
        assert src.count(old) == 1
        xg = ("tl.load(t_ptr + rm * G + (b * BK + ({} - SEG + 1) * J) // GROUP, mask=mmask, other=0.0)[None, :]")
        new = (f"acc += (p_lo - z_lo.to(tl.float32)[:, None] * {xg.format('u')}) * s_lo[:, None] + "
               f"(p_hi - z_hi.to(tl.float32)[:, None] * {xg.format('(u + 4)')}) * s_hi[:, None]")
        src = src.replace(old, new)
    if variant == "zsum":
        reps = [
            ("x_hi = tl.trans(tl.load(xb + (u + 4) * J, mask=mmask[:, None], other=0.0))\n",
             "x_hi = tl.trans(tl.load(xb + (u + 4) * J, mask=mmask[:, None], other=0.0))\n"
             "                xs_lo = tl.sum(x_lo.to(tl.float32), axis=0)\n"
             "                xs_hi = tl.sum(x_hi.to(tl.float32), axis=0)\n"),
            ("p_hi = tl.dot(hi, x_hi)\n", "p_hi = tl.dot(hi, x_hi)\n                        X_lo = xs_lo\n"
             "                        X_hi = xs_hi\n"),
            ("p_hi = tl.dot(hi, x_hi, p_hi)\n", "p_hi = tl.dot(hi, x_hi, p_hi)\n                        X_lo += xs_lo\n"
             "                        X_hi += xs_hi\n"),
            ("acc += p_lo * s_lo[:, None] + p_hi * s_hi[:, None]",
             "acc += (p_lo - z_lo.to(tl.float32)[:, None] * X_lo[None, :]) * s_lo[:, None] + "
             "(p_hi - z_hi.to(tl.float32)[:, None] * X_hi[None, :]) * s_hi[:, None]"),
        ]
        for old, new in reps:
            assert src.count(old) == 1, old
            src = src.replace(old, new)
    if variant == "tma":  # int4 weight tiles through TMA (a host-side tensor descriptor in place of q_ptr)
        reps = [
            ("wrow = q_ptr + (rn.to(tl.int64) * KW)[:, None] + jh[None, :]", "wrow = 0"),
            ("hrow = q_ptr + (rn.to(tl.int64) * KW)[:, None] + tl.arange(0, J // 4)[None, :]", "hrow = 0"),
            ("w_lo = tl.load(wrow + b * WPB, mask=nmask[:, None], other=0)", "w_lo = q_ptr.load([pid_n * BN, b * WPB])"),
            ("w_hi = tl.load(wrow + b * WPB + H, mask=nmask[:, None], other=0)",
             "w_hi = q_ptr.load([pid_n * BN, b * WPB + H])"),
        ]
        for old, new in reps:
            assert src.count(old) == 1, old
            src = src.replace(old, new)
    if variant == "regpf":  # the next block's words into registers at the top of each iteration
        old = src[src.index("        for b in range(b_lo, b_hi):\n"):src.index("            xb = xrow + b * BK\n")]
        new = """        WPB: tl.constexpr = J * BITS // 4  # words a row per block
        pm = (nmask & (rn * 0 + b_lo < b_hi))[:, None]
        n_lo = tl.load(wrow + b_lo * WPB, mask=pm, other=0)
        if BITS == 4:
            n_hi = tl.load(wrow + b_lo * WPB + H, mask=pm, other=0)
        if BITS == 3:
            n_q = tl.load(hrow + b_lo * WPB + H, mask=pm, other=0)
        for b in range(b_lo, b_hi):
            pm = (nmask & (rn * 0 + b + 1 < b_hi))[:, None]  # none past the split's last block
            w_lo = n_lo
            n_lo = tl.load(wrow + (b + 1) * WPB, mask=pm, other=0)
            if BITS == 4:
                w_hi = n_hi
                n_hi = tl.load(wrow + (b + 1) * WPB + H, mask=pm, other=0)
            if BITS == 3:
                wq = n_q
                n_q = tl.load(hrow + (b + 1) * WPB + H, mask=pm, other=0)
                wh = tl.reshape(tl.join(wq, wq >> 8), (BN, H))
"""
        assert src.count(old) == 1
        src = src.replace(old, new)
    if variant == "chain":
        old = "    pid_k = tl.program_id(2)\n"
        assert src.count(old) == 1
        src = src.replace(old, old + "    if PDL:\n        gdc_launch_dependents()\n        gdc_wait()\n")
    return src


def load_variants(tmp: str) -> dict:
    kernels = {}
    for v in VARIANTS:
        path = os.path.join(tmp, f"wa_probe_{v}.py")
        with open(path, "w") as f:
            f.write(patched_source(v))
        spec = importlib.util.spec_from_file_location(f"wa_probe_{v}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        kernels[v] = mod.wa_kernel
    return kernels


def launch(kern, variant: str, x, lay, bits: int, cfg: list[int], out, xs=None) -> None:
    import triton

    k, n, j = x.shape[1], lay.q.shape[0], lay.j
    bm, bn, split, warps, stages = cfg[:5]
    blocks = k // (8 * j)
    tt = xs if variant == "zfold" else x.unsqueeze(0)
    chain = variant == "chain" and x.is_cuda
    q = lay.q
    if variant == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        q = TensorDescriptor.from_tensor(lay.q, [bn, j // 2])
    kern[(triton.cdiv(x.shape[0], bm), triton.cdiv(n, bn), split)](
        x, out, q, lay.scales, lay.zeros if lay.zeros is not None else lay.scales, tt, x, x.shape[0], n,
        k * bits // 32, blocks, -(-blocks // split), k // 128, 1, 1, x.stride(0), out.stride(0), 0, 0, 0,
        SYMMETRIC=lay.zeros is None, GROUP=128, J=j, HAS_LR=False, BR=16, TCP=1, BM=bm, BN=bn, USE_ASM=x.is_cuda,
        ATOMIC=split > 1, BITS=bits, HALF=bool(cfg[5]), num_warps=warps, num_stages=stages, PDL=chain,
        **({"launch_pdl": True} if chain else {}))


def make(shape: str, bits: int, dev: str, seed: int = 0):
    from tensorslim.formats import IntGroup, quantize_rtn
    from tensorslim.kernels import dispatch
    from tensorslim.kernels.layout import wa_layout

    k, n = (int(v) for v in shape.split("x"))
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = quantize_rtn((torch.randn(n, k, generator=g) * 0.02).to(dev), IntGroup(bits=bits, group_size=128))
    return w, wa_layout(dispatch.layout(w))


def call(kern, variant, x, lay, bits, cfg):
    """One dispatcher-like call: allocate (and for split-K zero) the output; ``zfold`` computes the group sums."""
    m, n = x.shape[0], lay.q.shape[0]
    xs = x.float().view(m, -1, 128).sum(-1).contiguous() if variant == "zfold" else None
    out = (torch.zeros if cfg[2] > 1 else torch.empty)(m, n, device=x.device,  # fp32 under the interpreter
                                                       dtype=torch.float32 if cfg[2] > 1 or not x.is_cuda else x.dtype)
    launch(kern, variant, x, lay, bits, cfg, out, xs)
    return out


def _warm(task):
    shape, m, bits, cfg, variant = task
    with tempfile.TemporaryDirectory() as tmp:
        kern = load_variants(tmp)[variant]
        try:
            _, lay = make(shape, bits, "cuda")
            x = torch.randn(m, int(shape.split("x")[0]), device="cuda", dtype=torch.bfloat16)
            call(kern, variant, x, lay, bits, cfg)
            torch.cuda.synchronize()
            return None
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:200]}"


def compare_paths(specs: list[str], rounds: int = 3) -> None:
    """The same "wa" config timed three ways on the same weight copies, ``rounds`` times in alternation, next to
    cuBLAS bf16: does the dispatcher's call add GPU time over a bare launch?"""
    from kernels import bench_graph, n_copies

    from tensorslim.kernels import dispatch, ops

    tmp = tempfile.mkdtemp()
    base = load_variants(tmp)["base"]
    for spec in specs:
        shape, m, cfg = spec.split(":")
        m, cfg = int(m), [int(v) for v in cfg.split(",")]
        k, n = (int(v) for v in shape.split("x"))
        ws = [make(shape, 4, "cuda", seed=i) for i in range(n_copies(n * k // 2))]
        wls = [dispatch.wa_of(dispatch.layout(w)) for w, _ in ws]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        fns = {
            "bf16": [lambda d=d: torch.nn.functional.linear(x, d) for d in dense],
            "launch": [lambda L=L: call(base, "base", x, L, 4, cfg) for L in wls],
            "wa_mm": [lambda L=L: ops.wa_mm(x, L.q, L.scales, L.zeros, None, None, dispatch.wa_meta(L), cfg,
                                            torch.bfloat16) for L in wls],
            "kernel_linear": [lambda w=w: dispatch.kernel_linear(w, x, choice=("wa", tuple(cfg))) for w, _ in ws],
        }
        for r in range(rounds):
            print(spec, f"round {r}:", "  ".join(f"{name} {bench_graph(f):.1f}" for name, f in fns.items()),
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--cpu", action="store_true", help="interpreter smoke test on small shapes (no timing)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which variants to time")
    ap.add_argument("--cases", default="", help="shape:batch:bits:BM,BN,SPLIT,warps,stages,half;... instead of the "
                    "built-in list")
    ap.add_argument("--paths", default="", help="shape:batch:BM,BN,SPLIT,warps,stages,half,... instead: one config "
                    "through a bare launch, ops.wa_mm and dispatch.kernel_linear on the same weights, alternating")
    args = ap.parse_args()
    if args.paths:
        return compare_paths(args.paths.split(";"))
    from tensorslim.kernels.reference import relative_error

    dev = "cpu" if args.cpu else "cuda"
    cases = CPU_CASES if args.cpu else CASES
    if args.cases:
        cases = [(sh, int(m), int(b), [[int(v) for v in c.split(",")]])
                 for sh, m, b, c in (spec.split(":") for spec in args.cases.split(";"))]
    variants = [v for v in args.variants.split(",") if not (args.cpu and v == "tma")]  # descriptors: GPU only
    tmp = tempfile.mkdtemp()
    kernels = load_variants(tmp)
    t0 = time.time()
    if not args.cpu and args.jobs:
        import multiprocessing as mp

        tasks = [(sh, m, b, c, v) for sh, m, b, cs in cases for c in cs for v in variants]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            errs = pool.map(_warm, tasks, chunksize=1)
        print(f"compiled {len(tasks)} in {time.time() - t0:.0f}s; failures: {[e for e in errs if e][:3]}", flush=True)
    from kernels import bench_graph, n_copies

    results = []
    for shape, m, bits, cfgs in cases:
        k, n = (int(v) for v in shape.split("x"))
        w, lay = make(shape, bits, dev)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float16)  # interpreter: fp16
        ref = x.float() @ w.decode().float().t()
        row = {"shape": shape, "m": m, "bits": bits, "rows": []}
        if not args.cpu:
            lays = [lay] + [make(shape, bits, dev, seed=i)[1] for i in range(1, n_copies(n * k * bits // 8))]
            dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
            row["bf16_us"] = bench_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in dense])
            del dense
        for cfg in cfgs:
            for v in variants:
                try:
                    out = call(kernels[v], v, x, lay, bits, cfg)
                    err = None if v == "nozp" else relative_error(out.float(), ref)
                    us = None if args.cpu else bench_graph([lambda L=L: call(kernels[v], v, x, L, bits, cfg)
                                                            for L in lays])
                except Exception as e:  # a variant that does not compile is reported, not fatal
                    err, us = f"{type(e).__name__}: {str(e)[:160]}", None
                row["rows"].append({"config": cfg, "variant": v, "us": us, "err": err})
                sp = f"{row['bf16_us'] / us:.2f}x" if us else ""
                print(f"{shape} m={m} int{bits} {cfg} {v:6s} us={us and round(us, 1)} {sp} err={err}", flush=True)
        results.append(row)
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    tmpf = os.path.join(out_dir, "wa_probe.json.tmp")
    with open(tmpf, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                   "results": results}, f, indent=1)
    os.replace(tmpf, os.path.join(out_dir, "wa_probe.json"))
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
