"""Run the tuned int4 g128 kernels once each on 8192x28672 (batch 1, 16, 64) for a profiler (Nsight Compute).

    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section LaunchStats --section Occupancy python bench/profile_kernel.py
Prints the tuned choice per batch; only the timed launch after tuning is inside the profiler range.
"""

from __future__ import annotations

import sys

sys.path.insert(0, "src")

import torch  # noqa: E402


def main() -> None:
    from tensorslim.formats import parse_format, quantize_rtn
    from tensorslim.kernels import dispatch

    k, n = 8192, 28672
    w = torch.randn(n, k, device="cuda") * 0.02
    cw = quantize_rtn(w, parse_format("int4:g128"))
    lay = dispatch.layout(cw)
    for m in (1, 16, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        choice = dispatch.tuned_choice(lay, x, None)
        print(m, choice, flush=True)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # ncu --profile-from-start off: only these launches are profiled
        dispatch.run_choice(choice, lay, x, None, torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
