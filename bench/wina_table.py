"""WINA vs TEAL activation sparsity on SmolLM2-135M at 25/40/50%: perplexity, KL, top-1 against the dense model.

Top-k masks per token (exact sparsity) on every block linear, uniform allocation. Prints a markdown table; writes
JSON under runs/.

    python bench/wina_table.py --eval-tokens 32768
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from tensorslim.eval.lm import evaluate_lm
from tensorslim.eval.text import read_text, tokenize_text
from tensorslim.models import get_adapter, load_model
from tensorslim.runtime import apply_activation_sparsity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="0.25,0.4,0.5")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--variants", default="teal,wina-norot",
                    help="comma-separated: teal, wina (SVD rotation, column norms on all linears), wina-kgate (norms "
                         "on k/gate only, as the release), wina-norot (the library default), wina-norot-kgate")
    ap.add_argument("--json", default="runs/wina_table.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model("smollm2-135m")
    eval_ids = tokenize_text(tok, read_text("/work/shared/data/wikitext-2-raw/wiki.test.raw"), args.eval_tokens)
    base_eval = evaluate_lm(base, eval_ids)
    out = [{"label": "dense", "perplexity": base_eval.perplexity, "kl_mean": 0.0, "top1": 1.0}]
    print(f"base ppl {base_eval.perplexity:.3f}", flush=True)
    for level in [float(x) for x in args.levels.split(",")]:
        for variant in args.variants.split(","):
            kind = "teal" if variant == "teal" else "wina"
            opts = {"transform": "norot" not in variant, "weighted": "kgate" if "kgate" in variant else "all"}
            model = copy.deepcopy(base)
            apply_activation_sparsity(model, get_adapter(model), None, level, kind=kind,
                                      **(opts if kind == "wina" else {}))
            ev = evaluate_lm(model, eval_ids, baseline=base)
            row = {"label": f"{variant} act:{level:g}", "kind": variant, "sparsity": level, "perplexity": ev.perplexity,
                   "kl_mean": ev.kl_mean, "top1": ev.top1_agreement}
            out.append(row)
            print(json.dumps(row), flush=True)
            del model
    meta = {"eval_tokens": int(eval_ids.numel()), "machine": "2-core CPU (this dev machine)", "mask": "top-k per token"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": out}, indent=1))
    print(f"\nSmolLM2-135M, {meta['eval_tokens']} eval tokens, top-k masks on all block linears\n")
    print("| method | ppl | KL | top-1 |")
    print("|---|---|---|---|")
    for r in out:
        print(f"| {r['label']} | {r['perplexity']:.2f} | {r['kl_mean']:.4f} | {r['top1']:.3f} |")


if __name__ == "__main__":
    main()
