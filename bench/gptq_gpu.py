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
from tensorslim.methods.gptq import GroupProjector, gptq_quantize  # noqa: E402
from tensorslim.methods.obs import layer_objective, obs_solve  # noqa: E402


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

    t_gptq, cw = timed(lambda: gptq_quantize(w, h, fmt), dev, args.repeats)

    def loop_only():
        proj = GroupProjector(fmt, n, n, order=None, static=None, device=dev)
        return obs_solve(w, h, proj, block_size=128)

    t_loop, _ = timed(loop_only, dev, args.repeats)
    t_rtn, rtn = timed(lambda: quantize_rtn(w, fmt), dev, args.repeats)
    f_g, f_r = layer_objective(w, cw.decode(), h), layer_objective(w, rtn.decode(), h)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\nGPTQ {fmt.spec()} on a {n}x{n} layer, {n}x{n} Hessian, {name}, torch {torch.__version__}\n")
    print("| step | median seconds |")
    print("|---|---|")
    print(f"| gptq_quantize (damping, Cholesky, OBS loop, packing, RTN safeguard) | {t_gptq:.3f} |")
    print(f"| obs_solve loop only | {t_loop:.3f} |")
    print(f"| RTN | {t_rtn:.3f} |")
    print(f"\nlayer objective GPTQ / RTN = {f_g / f_r:.4f}")
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "n": n, "format": fmt.spec(), "gptq_s": t_gptq, "loop_s": t_loop,
                               "rtn_s": t_rtn, "objective_ratio": f_g / f_r}, indent=1))


if __name__ == "__main__":
    main()
