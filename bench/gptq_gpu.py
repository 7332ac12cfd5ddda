"""GPTQ on one 4096x4096 layer with a 4096x4096 Hessian, on the GPU (target: under 0.5 s per layer).

Self-contained: torch plus this repository's src/ (no model, no data). Run on a CUDA machine:
    python bench/gptq_gpu.py [--bits 4 --group 128 --repeats 3]
Prints a markdown table (median seconds of the whole GPTQ call incl. Cholesky, the OBS loop alone, RTN for
reference) and the layer objective vs RTN; writes runs/gptq_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tensorslim.formats.intgroup import IntGroup, quantize_rtn  # noqa: E402
from tensorslim.methods.gptq import gptq_quantize  # noqa: E402
from tensorslim.methods.obs import layer_objective  # noqa: E402


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="runs/gptq_gpu.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 solve, as on CPU
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = args.n
    w = (torch.randn(n, n, generator=gen) * 0.02).to(dev)
    x = torch.randn(args.tokens, n, generator=gen).to(dev)
    x = x * torch.rand(n, generator=gen).mul(2).exp().to(dev)  # uneven channel scales, like real activations
    h = x.T @ x / args.tokens
    fmt = IntGroup(bits=args.bits, group_size=args.group)

    t_gptq, cw = timed(lambda: gptq_quantize(w, h, fmt), dev, args.repeats)  # fused block kernel on CUDA
    t_loop, cw_loop = timed(lambda: gptq_quantize(w, h, fmt, fused=False), dev, args.repeats)  # per-column loop
    t_def, cw_def = timed(lambda: gptq_quantize(w, h, fmt, act_order=True, grid="imatrix"), dev, args.repeats)
    t_rtn, rtn = timed(lambda: quantize_rtn(w, fmt), dev, args.repeats)
    f_r = layer_objective(w, rtn.decode(), h)
    f_g, f_l, f_d = (layer_objective(w, c.decode(), h) for c in (cw, cw_loop, cw_def))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\nGPTQ {fmt.spec()} on a {n}x{n} layer, {n}x{n} Hessian, {name}, torch {torch.__version__}\n")
    print("| gptq_quantize (damping, Cholesky, OBS loop, packing, RTN safeguard) | median seconds | objective / RTN |")
    print("|---|---|---|")
    print(f"| natural order, min-max grids, fused block kernel (default on CUDA) | {t_gptq:.3f} | {f_g / f_r:.4f} |")
    print(f"| natural order, min-max grids, per-column loop (fused=False) | {t_loop:.3f} | {f_l / f_r:.4f} |")
    print(f"| act-order + clipped static grids (the `gptq` method's defaults), fused | {t_def:.3f} | {f_d / f_r:.4f} |")
    print(f"| RTN | {t_rtn:.3f} | 1 |")
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "n": n, "format": fmt.spec(), "gptq_fused_s": t_gptq,
                               "gptq_loop_s": t_loop, "gptq_defaults_s": t_def, "rtn_s": t_rtn,
                               "objective_ratio": {"fused": f_g / f_r, "loop": f_l / f_r, "defaults": f_d / f_r}},
                              indent=1))


if __name__ == "__main__":
    main()
