"""GPU memory of compressed linears as the kernels run them, and the speed of the paths that read only the
weights-as-A repack.

Run from the repo root on a CUDA machine (no install needed):
    python bench/gpu_memory.py --jobs 15       # 4 Llama-2-7B-shaped blocks; int4 g128 and int3 g128
    python bench/gpu_memory.py --layers 2 --formats int4:g128 --rows 256,2048

Part 1, memory: the seven linears of ``--layers`` Llama-2-7B blocks (q, k, v, o 4096x4096; gate, up 4096x11008;
down 11008x4096) as bf16 ``nn.Linear`` and as ``CompressedLinear`` in each format, built on the GPU from the same
random bf16 weights. For each state, ``torch.cuda.memory_allocated()`` (live tensors, after a synchronize) over the
weights' parameter count, in bits per weight:
- ``stored``: the compressed weights as stored, before any call;
- ``runtime``: after a call at 1 and 64 rows (tuning done; the dispatcher keeps its runtime layout);
- ``sessions <= 10``: plus the transposed layout, which the dispatcher kept beside the "wa" repack before (rebuilt
  here with ``dispatch.layout``, then dropped);
- ``prepared``: after ``CompressedLinear.prepare_kernels()`` (the stored weight moved to host memory).
Several formats run one process each (a fixed ~75 MB left by one format's first calls would otherwise skew the
next one's count). Each state's outputs at 1 and 64 rows are checked against ``x @ decode()^T`` in fp32 (relative error <= 1e-3, bf16
activations, fp32 outputs; "dequant" against the decoded weights rounded to bf16, as that path rounds them), and
the largest relative difference between the ``runtime`` and ``prepared`` bf16 outputs is reported (same kernel and
config; split-K adds its partial sums in arrival order, so the last bits may differ).

Part 2, speed at many rows (``--rows``) on 4096x14336, 14336x4096 and 4096x4096 (int4 g128): the runtime choice
(tuned over "wa" configs and "dequant" from the repack) against the former "dequant" (transposed layout, then cuBLAS),
the full layout's tuned choice (every path), and cuBLAS bf16; CUDA-graph replays over weight copies > 2x L2,
median (``bench/kernels.py``'s ``bench_graph``). Writes ``$OUT/gpu_memory.json`` (or ``runs/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, "src")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

BLOCK = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096), ("gate", 4096, 11008),
         ("up", 4096, 11008), ("down", 11008, 4096)]  # (name, in, out)
TOL = 1e-3


def allocated() -> int:
    torch.cuda.synchronize()
    gc.collect()
    return torch.cuda.memory_allocated()


def build_dense(layers: int, seed: int = 0) -> list[torch.nn.Linear]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(layers):
        for _, k, n in BLOCK:
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, k, device="cuda", generator=g) * 0.02)
            out.append(lin)
    return out


def reference(cw, x: torch.Tensor, path: str) -> torch.Tensor:
    """``x @ decode()^T`` in fp32; for "dequant" (the weights decoded to the activation dtype, then cuBLAS, as a
    bf16 model rounds them) with the decoded weights rounded to that dtype first. "dequant" returns cuBLAS's
    product in the activation dtype, so its bound is 4e-3 (as in ``bench/kernels.py``)."""
    from tensorslim.kernels.reference import reference_fp32

    if path != "dequant":
        return reference_fp32(cw, x)
    return x.float() @ cw.decode(torch.float32).to(x.dtype).float().t()


def check(mods, xs, tag: str, refs: dict) -> tuple[float, list[torch.Tensor]]:
    """Worst relative error of every module at each batch in ``xs`` (fp32 outputs of the path the module runs)
    against the fp32 reference (cached in ``refs``), and the modules' own (bf16) outputs."""
    from tensorslim.kernels import dispatch
    from tensorslim.kernels.reference import relative_error

    worst, outs = 0.0, []
    for i, mod in enumerate(mods):
        for m, x in xs[mod.in_features].items():
            out = mod(x)
            outs.append(out)
            lay = mod._kernel[0] if mod._kernel is not None else dispatch.runtime_layout(mod.compressed)
            y = dispatch.layout_linear(lay, None, x, out_dtype=torch.float32)
            choice = dispatch.tuned_choice(lay, x, None)
            if (i, m, choice[0]) not in refs:
                refs[(i, m, choice[0])] = reference(mod.compressed, x, choice[0])
            ref = refs[(i, m, choice[0])]
            worst = max(worst, relative_error(y, ref) / (4 if choice[0] == "dequant" else 1))  # bf16 product
            e16 = relative_error(out, ref)  # the module's own bf16 output: one rounding, ~1e-3
            if not e16 <= 4e-3:
                print(f"FAIL {tag}: module {i} ({mod.in_features}->{mod.out_features}) m={m} {choice}: bf16 output "
                      f"rel err {e16:.2e}, fp32 output {relative_error(y, ref):.2e}", flush=True)
    if not worst <= TOL:
        print(f"FAIL {tag}: relative error {worst:.2e}", flush=True)
    return worst, outs


def kernel_bytes(mods) -> int:
    """Bytes of the "wa" repacks the modules run from (their runtime layouts)."""
    from tensorslim.kernels import dispatch

    total = 0
    for mod in mods:
        lay = mod._kernel[0] if mod._kernel is not None else dispatch._RUNTIME.get(mod.compressed)
        wl = dispatch._WA.get(lay) if lay is not None else None
        if wl is not None:
            total += sum(t.untyped_storage().nbytes() for t in (wl.q, wl.scales, wl.zeros) if t is not None)
    return total


def scratch_bytes() -> int:
    from tensorslim.kernels import ops

    return sum(t.untyped_storage().nbytes() for pairs in ops._SCRATCH.values() for pair in pairs for t in pair)


def live_cuda_tensors(top: int = 8) -> None:
    """The largest groups of live CUDA tensors by (shape, dtype): what holds memory beyond the expected layouts."""
    from collections import Counter

    seen, sizes, counts = set(), Counter(), Counter()
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda and id(o) not in seen:
                seen.add(id(o))
                key = (tuple(o.shape), str(o.dtype).replace("torch.", ""))
                sizes[key] += o.untyped_storage().nbytes()
                counts[key] += 1
        except Exception:
            pass
    for key, b in sizes.most_common(top):
        print(f"  live: {counts[key]} x {key}: {b / 2**20:.1f} MiB (storages, shared ones counted per tensor)")


def memory_part(layers: int, formats: list[str], diagnose: bool = False) -> list[dict]:
    from tensorslim.formats import CompressedLinear, parse_format, quantize_rtn
    from tensorslim.kernels import dispatch

    params = layers * sum(k * n for _, k, n in BLOCK)
    base0 = allocated()
    dense = build_dense(layers)
    rows = [{"format": "bf16", "state": "nn.Linear", "bits_per_weight": 16.0,
             "gpu_bits_per_weight": 8 * (allocated() - base0) / params}]
    print(f"bf16: {rows[0]['gpu_bits_per_weight']:.3f} bits/weight on the GPU ({params / 1e6:.0f}M weights)", flush=True)
    xs = {k: {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in (1, 64)} for k in (4096, 11008)}
    for spec in formats:
        fmt = parse_format(spec)
        start = allocated()
        mods = [CompressedLinear(quantize_rtn(d.weight.float(), fmt)) for d in dense]
        bpw = mods[0].compressed.bits_per_weight
        states = {}

        def note(state: str, err: float | None = None, held: tuple = (), mods: list = mods) -> None:
            """``held``: this bench's own tensors (outputs, references), left out of the count."""
            own = sum(t.untyped_storage().nbytes() for group in held for t in group)
            states[state] = 8 * (allocated() - start - own) / params
            row = {"format": spec, "state": state, "bits_per_weight": bpw, "gpu_bits_per_weight": states[state],
                   "kernel_copy_bits_per_weight": 8 * kernel_bytes(mods) / params,
                   "split_scratch_mib": scratch_bytes() / 2**20}
            if err is not None:
                row["rel_err"] = err
            rows.append(row)
            print(f"{spec} {state}: {states[state]:.3f} bits/weight on the GPU (kernel copy "
                  f"{row['kernel_copy_bits_per_weight']:.3f}, split-K scratch {row['split_scratch_mib']:.1f} MiB)"
                  + (f" (rel err {err:.1e})" if err is not None else ""), flush=True)

        note("stored")
        refs: dict = {}
        err, outs_rt = check(mods, xs, f"{spec} runtime", refs)
        note("runtime", err, (outs_rt, refs.values()))
        if diagnose:
            live_cuda_tensors()
        old = [dispatch.layout(dispatch._int_part(m_.compressed)) for m_ in mods]  # + the transposed words
        note("sessions <= 10", None, (outs_rt, refs.values()))
        del old
        dispatch._LAYOUTS.clear()  # the full layouts were only for the measurement above
        t0 = time.time()
        prepared = sum(m_.prepare_kernels() for m_ in mods)
        note("prepared", None, (outs_rt, refs.values()))
        rows[-1]["prepared_modules"] = f"{prepared}/{len(mods)}"
        rows[-1]["prepare_s"] = time.time() - t0
        err, outs_p = check(mods, xs, f"{spec} prepared", refs)
        rows[-1]["rel_err"] = err
        from tensorslim.kernels.reference import relative_error

        diff = max(relative_error(a, b) for a, b in zip(outs_p, outs_rt))  # split-K adds in arrival order
        rows[-1]["rel_diff_to_runtime"] = diff
        print(f"{spec}: prepared vs runtime outputs (bf16), largest relative difference {diff:.1e}", flush=True)
        del mods, outs_rt, outs_p, refs
        dispatch._RUNTIME.clear()
    del dense
    return rows


def speed_part(rows: list[int]) -> list[dict]:
    from kernels import bench_graph, make_int, n_copies
    from tensorslim.kernels import dispatch
    from tensorslim.kernels.reference import relative_error

    out = []
    for k, n in [(4096, 14336), (14336, 4096), (4096, 4096)]:
        cws = []
        w = None
        for i in range(n_copies(k * n // 2)):
            w_, cw = make_int(k, n, "int4:g128", seed=i)
            w = w if w is not None else w_
            cws.append(cw)
        ws = [w.to(torch.bfloat16)] + [torch.randn_like(w, dtype=torch.bfloat16) for _ in range(n_copies(k * n * 2) - 1)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{k}x{n}", "m": m}
            y = dispatch.kernel_linear(cws[0], x, out_dtype=torch.float32)
            row["runtime_path"] = list(dispatch.tuned_choice(dispatch.runtime_layout(cws[0]), x, None))
            row["runtime_rel_err"] = relative_error(y, reference(cws[0], x, row["runtime_path"][0]))
            row["runtime_us"] = bench_graph([lambda c=c: dispatch.kernel_linear(c, x) for c in cws])
            row["old_dequant_us"] = bench_graph([lambda c=c: dispatch.kernel_linear(c, x, choice=("dequant", ()))
                                                 for c in cws])
            full = dispatch.tune(dispatch.layout(cws[0]), dispatch._pow2(m), x.dtype)
            row["full_path"] = [full[0], list(full[1])]
            row["full_us"] = bench_graph([lambda c=c: dispatch.kernel_linear(c, x, choice=full) for c in cws])
            row["bf16_us"] = bench_graph([lambda v=v: torch.nn.functional.linear(x, v) for v in ws])
            out.append(row)
            print(f"{k}x{n} m={m}: runtime {row['runtime_us']:.1f} us {row['runtime_path']} (err "
                  f"{row['runtime_rel_err']:.1e}), old dequant {row['old_dequant_us']:.1f}, full tuned "
                  f"{row['full_us']:.1f} {row['full_path']}, bf16 {row['bf16_us']:.1f}", flush=True)
            if not row["runtime_rel_err"] <= (4 * TOL if row["runtime_path"][0] == "dequant" else TOL):
                print(f"FAIL {k}x{n} m={m}: runtime path rel err {row['runtime_rel_err']:.2e}", flush=True)
        del cws, ws
        dispatch._LAYOUTS.clear()
        dispatch._RUNTIME.clear()
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--formats", default="int4:g128,int3:g128")
    ap.add_argument("--rows", default="256,2048", help="batch sizes of part 2 ('' skips it)")
    ap.add_argument("--diagnose", action="store_true", help="list the live CUDA tensors after the first calls")
    ap.add_argument("--jobs", type=int, default=0, help="compile the tuner's candidates in this many processes first")
    args = ap.parse_args()
    formats = args.formats.split(",")
    rows = [int(m) for m in args.rows.split(",")] if args.rows else []
    if args.jobs:
        from kernels import prewarm

        tasks = [(k, n, spec, [1, 64]) for spec in formats for k, n in {(k, n) for _, k, n in BLOCK}]
        tasks += [(k, n, "int4:g128", rows) for k, n in [(4096, 14336), (14336, 4096), (4096, 4096)] if rows]
        prewarm(tasks, args.jobs)
    if len(formats) > 1:  # one process per format: what one format's first calls leave behind (a fixed ~75 MB,
        # likely cuBLAS workspaces) is released during the next one's and would skew its count (session 11)
        import subprocess

        memory = memory_part(args.layers, [], args.diagnose)  # the bf16 row
        for spec in formats:
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--formats", spec, "--rows", ""]
                               + (["--diagnose"] if args.diagnose else []), env={**os.environ, "OUT": tmp},
                               check=True)
                with open(os.path.join(tmp, "gpu_memory.json")) as f:
                    memory += [r for r in json.load(f)["memory"] if r["format"] != "bf16"]
    else:
        memory = memory_part(args.layers, formats, args.diagnose)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "memory": memory}
    if rows:
        res["speed"] = speed_part(rows)
    path = os.path.join(os.environ.get("OUT") or "runs", "gpu_memory.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
