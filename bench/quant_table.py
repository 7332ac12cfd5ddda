"""Side-by-side table of the integer quantization methods on SmolLM2-135M (standard protocol).

Usage (full protocol, as in docs/results/quantization.md):
    python bench/quant_table.py --methods rtn,rtn-imatrix,hqq,gptq,quantease,quantease-outliers --bits 4,3 \
        --group 64 --json runs/quant_table.json
Quick check while developing: ``--eval-tokens 8192 --samples 32``.

For every (bits, method): load a fresh model, calibrate on ``--calib`` (samples x seq_len tokens, seed 0), compress
every block linear, then evaluate perplexity on the first ``--eval-tokens`` tokens of ``--eval-text`` (windows of
2048) with KL / top-1 against the base model. Prints a markdown table; writes JSON under runs/.
Method options: ``--opt gptq.act_order=true --opt quantease.iters=10`` (values parsed as JSON, else strings).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from quant_args import ROOT, parse_quant_args  # noqa: E402  (bench/ is on sys.path when run as a script)


def run_row(ts, args, base, tok, tokens, data, reference, spec, name, opts, comp) -> dict:
    from tensorslim.formats import parse_format
    from tensorslim.methods import build_method
    from tensorslim.methods.eora import parse_compensate

    model, _ = ts.load_model(args.model)
    method = build_method(name, parse_format(spec), **opts.get(name, {}))
    compensate = None if comp == "none" else parse_compensate(comp)
    needs_data = bool(method.requires) or compensate is not None
    t0 = time.perf_counter()
    res = ts.compress(model, method, data if needs_data else None, compensate=compensate, progress=False,
                      **({"calib_dtype": args.calib_dtype} if needs_data else {}))
    secs = time.perf_counter() - t0
    rep = ts.evaluate(model, tok, tokens, baseline=None if args.no_kl else reference, max_tokens=None)
    row = {
        "method": name if comp == "none" else f"{name} + {comp}", "format": spec, "options": opts.get(name, {}),
        "perplexity": rep.perplexity, "kl_mean": rep.kl_mean, "kl_p99": rep.kl_p99, "top1": rep.top1_agreement,
        "bits_per_weight": res.bits_per_weight, "compress_seconds": secs, "eval_seconds": rep.seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def setup(args):
    """Load the base model once; tokens, calibration data and the cached base-model logits shared by all rows."""
    import tensorslim.api as ts
    from tensorslim.eval import CachedBaseline
    from tensorslim.eval.text import read_text, tokenize_text

    base, tok = ts.load_model(args.model)
    # the base model's logits are computed once and reused for every row's KL / top-1 (bit-identical)
    reference = CachedBaseline(base, directory=args.reference_cache)
    tokens = tokenize_text(tok, read_text(args.eval_text), args.eval_tokens)
    data = ts.calibration_data(tok, args.calib, samples=args.samples, seq_len=args.seq_len, seed=0)
    return ts, base, tok, tokens, data, reference


def report(args, rows: list[dict]) -> None:
    print(f"\nSmolLM2-135M, calib {args.samples}x{args.seq_len} of {Path(args.calib).name}, eval first "
          f"{args.eval_tokens} tokens of {Path(args.eval_text).name}, 2-core CPU (this dev machine)\n")
    print("| format | method | ppl | KL | top-1 | bits/weight | compress s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kl = "-" if r["kl_mean"] is None else f"{r['kl_mean']:.4f}"
        t1 = "-" if r["top1"] is None else f"{r['top1']:.4f}"
        print(f"| {r['format']} | {r['method']} | {r['perplexity']:.2f} | {kl} | {t1} | "
              f"{r['bits_per_weight']:.3f} | {r['compress_seconds']:.0f} |")
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def main() -> None:
    args, opts = parse_quant_args("runs/quant_table.json", sym=True)
    ts, base, tok, tokens, data, reference = setup(args)
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for group in args.group.split(","):
            spec = f"int{bits}:" + ("pc" if group == "pc" else f"g{group}") + (":sym" if args.sym else "")
            for name in args.methods.split(","):
                for comp in args.compensate.split(","):
                    rows.append(run_row(ts, args, base, tok, tokens, data, reference, spec, name, opts, comp))
                    report(args, rows)  # rewritten after every row, so a stopped run keeps what it measured


if __name__ == "__main__":
    main()
