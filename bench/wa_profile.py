"""Run chosen weights-as-A int4 configs once each inside a profiler range (Nsight Compute), printing registers.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats python bench/wa_profile.py 8192x28672:1:32:16,64,2,4,3 ...
Each argument is ``shape:batch:j:BM,BN,SPLIT_K,warps,stages[:lr]`` (``lr``: with the fused Sum's epilogue).
"""

from __future__ import annotations

import sys

sys.path.insert(0, "src")

import torch  # noqa: E402


def main() -> None:
    from tensorslim.formats import IntGroup, quantize_rtn
    from tensorslim.kernels import dispatch, ops
    from tensorslim.kernels.layout import wa_layout

    for arg in sys.argv[1:]:
        shape, m, j, cfg, *lr = arg.split(":")  # a fifth field "lr": the fused Sum's epilogue (rank 32, 8 partials)
        k, n = (int(v) for v in shape.split("x"))
        m, j, cfg = int(m), int(j), [int(v) for v in cfg.split(",")]
        w = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, IntGroup(bits=4, group_size=128))
        lay = wa_layout(dispatch.layout(w), j)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(m, n, device="cuda", dtype=torch.float32 if cfg[2] > 1 else torch.bfloat16)
        t = torch.randn(8, m, 32, device="cuda") if lr else None
        u = torch.randn(n, 32, device="cuda", dtype=torch.float16) if lr else None
        ops.launch_wa(x, lay.q, lay.scales, lay.zeros, t, u, [k, 128, 0, j], cfg, out)  # compile
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        ops.launch_wa(x, lay.q, lay.scales, lay.zeros, t, u, [k, 128, 0, j], cfg, out)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        kern = ops.wa_kernel
        for c in kern.device_caches[0][0].values() if hasattr(kern, "device_caches") else []:
            print(arg, "regs", getattr(c, "n_regs", "?"), "spills", getattr(c, "n_spills", "?"),
                  "shared", c.metadata.shared, "warps", c.metadata.num_warps, flush=True)


if __name__ == "__main__":
    main()
