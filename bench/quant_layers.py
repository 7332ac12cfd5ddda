"""Layer-level comparison of the integer methods on real SmolLM2-135M layers with their real Hessians (cheap).

    python bench/quant_layers.py --bits 4,3 --group 64 --tokens 4096 --threads 1 --json runs/quant_layers.json

Captures the inputs of a few block linears (blocks --blocks, projections q/o/up/down) on --tokens tokens of the
calibration text in one forward of the dense model, then reports for each method the relative layer error
``tr((W-Q) H (W-Q)^T) / tr(W H W^T)`` (geometric mean over the layers), its ratio to RTN, bits per weight and solve
time. A proxy for the model-level table (bench/quant_table.py), useful when the machine is too busy for full runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TS_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rtn,rtn-imatrix,hqq,gptq,quantease,quantease-outliers",
                    help="comma list; options in brackets: gptq[grid=imatrix;damp=0.1]")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group", default="64")
    ap.add_argument("--blocks", default="2,15,28")
    ap.add_argument("--projs", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="runs/quant_layers.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tensorslim.api as ts
    from tensorslim.formats import parse_format
    from tensorslim.methods import build_method
    from tensorslim.stats import LayerStats

    model, tok = ts.load_model(args.model)
    data = ts.calibration_data(tok, args.calib, samples=args.tokens // 256, seq_len=256, seed=0)
    names = [f"model.layers.{b}.{p}" for b in args.blocks.split(",") for p in args.projs.split(",")]
    grams = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features, dtype=torch.float64)
             for n in names}
    count = {n: 0 for n in names}

    def hook(n):
        def f(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            grams[n] += x.T @ x
            count[n] += x.shape[0]
        return f

    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.inference_mode():
        for i in range(0, data.shape[0], 4):
            model.model(input_ids=data[i:i + 4])
    for h in hs:
        h.remove()
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        spec = f"int{bits}:g{args.group}"
        ref: dict[str, float] = {}
        for name in args.methods.split(","):
            # "gptq[grid=imatrix;damp=0.1]": a method with options
            base_name, _, rest = name.partition("[")
            kw = dict(kv.split("=", 1) for kv in rest.rstrip("]").split(";") if kv)
            kw = {k: json.loads(v) if v[:1] in "0123456789-tf[{" else v for k, v in kw.items()}
            method = build_method(base_name, parse_format(spec), **kw)
            logs, secs, nbytes, numel = [], 0.0, 0, 0
            for n in names:
                w = model.get_submodule(n).weight.detach().float()
                g = grams[n].float()
                stats = LayerStats(n_tokens=count[n], gram=g, norms=g.diagonal().clone())
                t0 = time.perf_counter()
                cw = method.apply(w, stats, layer=n)
                secs += time.perf_counter() - t0
                d = (w - cw.decode()).double()
                h = grams[n] / count[n]
                rel = float(((d @ h) * d).sum() / ((w.double() @ h) * w.double()).sum())
                logs.append(math.log(rel))
                nbytes, numel = nbytes + cw.nbytes, numel + cw.numel
            gm = math.exp(sum(logs) / len(logs))
            if name == "rtn":
                ref["rtn"] = gm
            rows.append({"format": spec, "method": name, "rel_error_geomean": gm,
                         "vs_rtn": gm / ref["rtn"] if "rtn" in ref else None,
                         "bits_per_weight": 8 * nbytes / numel, "solve_seconds": secs, "layers": len(names)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M, {len(names)} layers (blocks {args.blocks}: {args.projs}), Hessians from {args.tokens} "
          f"calibration tokens, torch threads {torch.get_num_threads()}, 2-core CPU (this dev machine)\n")
    print("| format | method | rel. layer error (geomean) | vs RTN | bits/weight | solve s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs = "-" if r["vs_rtn"] is None else f"{r['vs_rtn']:.3f}"
        print(f"| {r['format']} | {r['method']} | {r['rel_error_geomean']:.5f} | {vs} | {r['bits_per_weight']:.3f} | "
              f"{r['solve_seconds']:.1f} |")
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
