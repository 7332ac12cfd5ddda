"""Fast side-by-side of the integer methods with ONE statistics pass shared by all methods (not the sequential runner).

    python bench/quant_table_shared.py --methods rtn,rtn-imatrix,hqq,gptq,quantease,quantease-outliers --bits 4,3 \
        --group 64 --samples 128 --eval-tokens 8192 --threads 1 --json runs/quant_shared.json

Why: on the shared 2-core machine one sequential calibration (runner: forward, Gram, re-forward per block) takes
10-25 minutes, so a 12-row table through the runner does not fit a session. Here the Gram / norms of every block
linear are collected once from the *dense* model (one forward of the calibration batches, lm_head skipped), then each
method solves every layer from those statistics (one-shot, no error propagation between blocks) and the model is
evaluated (perplexity, KL and top-1 vs the dense model). Numbers are therefore slightly different from the CLI's
sequential ones; the method ranking is the point. Prints a markdown table; writes JSON under runs/.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from pathlib import Path

import torch

from quant_args import ROOT, parse_quant_args  # noqa: E402  (bench/ is on sys.path when run as a script)


@torch.inference_mode()
def collect(model, names, data, batch: int):
    from tensorslim.stats import Stat, new_accumulators, stats_from_accumulators

    accs, hooks, seen = {}, [], {}
    for n in names:
        lin = model.get_submodule(n)
        accs[n] = new_accumulators({Stat.GRAM, Stat.NORMS}, lin.in_features)

        def hook(mod, inp, out, n=n):
            x = inp[0]
            # q/k/v and gate/up read the same tensor: accumulate once, share (same parent module only, since freed
            # activations of an earlier block can reuse an address)
            key = (n.rsplit(".", 1)[0], x.data_ptr(), tuple(x.shape))
            if key in seen:
                seen[key].append(n)
                return
            seen[key] = [n]
            for a in accs[n].values():
                a.update(x, n)

        hooks.append(lin.register_forward_hook(hook))
    owner = {}
    body = model.model if hasattr(model, "model") else model
    for i in range(0, data.shape[0], batch):
        seen.clear()
        body(input_ids=data[i:i + batch])
        for group in seen.values():
            for n in group:
                owner[n] = group[0]
    for h in hooks:
        h.remove()
    return {n: stats_from_accumulators(accs[owner.get(n, n)]) for n in names}


def main() -> None:
    args, opts = parse_quant_args("runs/quant_shared.json")
    import tensorslim.api as ts
    from tensorslim.eval.text import read_text, tokenize_text
    from tensorslim.formats import CompressedLinear, parse_format
    from tensorslim.methods import build_method
    from tensorslim.models import get_adapter

    base, tok = ts.load_model(args.model)
    adapter = get_adapter(base)
    names = adapter.linear_names(base)
    tokens = tokenize_text(tok, read_text(args.eval_text), args.eval_tokens)
    data = ts.calibration_data(tok, args.calib, samples=args.samples, seq_len=args.seq_len, seed=0)
    t0 = time.perf_counter()
    stats = collect(base, names, data, 8)
    t_stats = time.perf_counter() - t0
    print(f"statistics of {len(names)} layers in {t_stats:.0f} s", flush=True)
    rows = []
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    for bits in [int(b) for b in args.bits.split(",")]:
        spec = f"int{bits}:g{args.group}" if args.group != "pc" else f"int{bits}:pc"
        for name in args.methods.split(","):
            method = build_method(name, parse_format(spec), **opts.get(name, {}))
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            nbytes = numel = 0
            for n in names:
                lin = model.get_submodule(n)
                cw = method.apply(lin.weight.detach().float(), stats[n], layer=n)
                nbytes, numel = nbytes + cw.nbytes, numel + cw.numel
                parent, _, child = n.rpartition(".")
                setattr(model.get_submodule(parent), child, CompressedLinear.from_linear(lin, cw, method=name))
            secs = time.perf_counter() - t0
            rep = ts.evaluate(model, tok, tokens, baseline=None if args.no_kl else base, max_tokens=None)
            rows.append({"method": name, "format": spec, "options": opts.get(name, {}), "perplexity": rep.perplexity,
                         "kl_mean": rep.kl_mean, "top1": rep.top1_agreement, "bits_per_weight": 8 * nbytes / numel,
                         "solve_seconds": secs, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
            print(json.dumps(rows[-1]), flush=True)
            path.write_text(json.dumps({"args": vars(args), "stats_seconds": t_stats, "rows": rows}, indent=1))
            del model
    print(f"\nSmolLM2-135M, one-shot statistics ({args.samples}x{args.seq_len} tokens of {Path(args.calib).name}, "
          f"{t_stats:.0f} s), eval first {args.eval_tokens} tokens of {Path(args.eval_text).name}, "
          f"torch threads {torch.get_num_threads()}, 2-core CPU (this dev machine)\n")
    print("| format | method | ppl | KL | top-1 | bits/weight (linears) | solve s (210 layers) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kl = "-" if r["kl_mean"] is None else f"{r['kl_mean']:.4f}"
        t1 = "-" if r["top1"] is None else f"{r['top1']:.4f}"
        print(f"| {r['format']} | {r['method']} | {r['perplexity']:.2f} | {kl} | {t1} | "
              f"{r['bits_per_weight']:.3f} | {r['solve_seconds']:.0f} |")


if __name__ == "__main__":
    main()
