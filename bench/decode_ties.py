"""Can two exact multiplies give the same greedy tokens on bench/decode.py's random model? (CPU or GPU)

    python bench/decode_ties.py [--layers 8] [--format int4:g128] [--new 24] [--device cpu]

The model of :mod:`decode` (Llama-2-7B widths, random N(0, 0.02) weights, ``--layers`` blocks, q/k/v and gate/up
fused) with every block linear compressed to ``--format``, decoded greedily from a 16-token prompt three ways, all
on the same compressed weights: "exact" (``decode()`` and the product in fp32, one rounding to bf16: what the kernels
compute, up to fp32 summation order), "f64" (the same product in float64: only the summation differs) and "bf16"
(``decode()`` in bf16, then ``F.linear``). Prints, against "exact": the free-running greedy prefix that is equal,
the teacher-forced top-1 agreement, and, at every teacher-forced position, exact's top-1 margin (logit of its first
choice minus its second) next to the largest logit difference between the two paths: a disagreement where the margin
is below that difference is a near-tie, which no exactly computed kernel can be held to. Writes
``$OUT/decode_ties.json`` (or ``runs/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, "src")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from decode import build, compress, generate_eager  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--format", default="int4:g128")
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    t0 = time.time()
    prompt_len = 16
    model, dense = build(args.layers, prompt_len + args.new + 1, True, args.device)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), device=args.device)
    toks, forced = {}, {}
    with torch.no_grad():
        for mode in ("exact", "f64", "bf16"):
            compress(model, dense, args.format, ref=mode)
            toks[mode] = generate_eager(model, prompt, args.new)
        for mode in ("exact", "f64", "bf16"):  # every path fed exact's tokens
            compress(model, dense, args.format, ref=mode)
            forced[mode] = generate_eager(model, prompt, args.new, forced=toks["exact"], with_logits=True)[1][0]
    top2 = forced["exact"].topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    res = {"layers": args.layers, "format": args.format, "device": args.device, "new": args.new, "paths": {}}
    print(f"{args.layers} layers, {args.format}, {args.device}: exact's top-1 margin per position "
          f"(median {sorted(margin)[len(margin) // 2]:.3f}, min {min(margin):.4f})")
    for mode in ("f64", "bf16"):
        prefix = int((toks[mode] == toks["exact"]).long().cumprod(1).sum())
        diff = (forced[mode] - forced["exact"]).abs().amax(-1).tolist()  # per position
        agree = (forced[mode].argmax(-1) == forced["exact"].argmax(-1)).tolist()
        flips = [{"pos": i, "margin": margin[i], "max_logit_diff": diff[i]} for i, a in enumerate(agree) if not a]
        res["paths"][mode] = {"greedy_equal_prefix": prefix, "teacher_forced_agree": sum(agree),
                              "max_logit_diff_median": sorted(diff)[len(diff) // 2], "disagreements": flips}
        print(f"  {mode} vs exact: greedy prefix equal {prefix} of {args.new}; teacher-forced top-1 {sum(agree)} of "
              f"{args.new}; max |logit difference| per position median {sorted(diff)[len(diff) // 2]:.4f}; "
              f"disagreements (margin, max diff): "
              + ", ".join(f"pos {f['pos']} ({f['margin']:.4f}, {f['max_logit_diff']:.4f})" for f in flips))
    res["margins"] = margin
    res["seconds"] = time.time() - t0
    print(f"total {res['seconds']:.0f}s")
    out_dir = os.environ.get("OUT") or "runs"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "decode_ties.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
