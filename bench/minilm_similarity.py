"""MiniLM (all-MiniLM-L6-v2): cosine similarity of compressed vs original sentence embeddings at 30% fewer parameters.

Sentence embeddings are mean-pooled last hidden states (attention-masked), as sentence-transformers does for this
model. Sentences: the first ``--sentences`` non-heading lines of wiki.test.raw (truncated to 128 tokens).
Calibration: ``--calib-samples`` windows of 126 tokens of WikiText-2 valid, each wrapped as ``[CLS] ... [SEP]`` (the
input form the encoder sees at evaluation; ``--no-wrap`` gives the bare windows of 128 tokens). Parameters counted:
the weights of all 36 encoder linears (q, k, v, attention output, intermediate, output of 6 layers; 10.6M);
biases, embeddings and LayerNorms stay dense and are not counted. Every factor entry counts.
Prints a markdown table; JSON in runs/.

    OMP_NUM_THREADS=1 python bench/minilm_similarity.py --reduction 0.3 --sentences 200 --methods svd-whitened
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from tensorslim.calib.data import calibration_data
from tensorslim.calib.fisher import prepare_assign
from tensorslim.calib.runner import run_compression
from tensorslim.eval.text import read_text
from tensorslim.formats import LowRank
from tensorslim.methods import build_method
from tensorslim.models import get_adapter, load_model

EVAL = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
CALIB = "/work/shared/data/wikitext-2/valid.txt"


def sentences(n: int) -> list[str]:
    out = []
    for line in read_text(EVAL).split("\n"):
        line = line.strip()
        if len(line) > 20 and not line.startswith("="):
            out.append(line)
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def embed(model, tok, texts: list[str], batch: int = 32) -> torch.Tensor:
    outs = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append((h * m).sum(1) / m.sum(1))
    return torch.cat(outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reduction", type=float, default=0.3)
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--methods", default="svd,svd-whitened,welore-whitened,svd-whitened-global")
    ap.add_argument("--no-wrap", action="store_true", help="bare 128-token windows (no [CLS]/[SEP])")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="runs/minilm_similarity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model("minilm-l6")
    adapter = get_adapter(base)
    names = adapter.linear_names(base)
    texts = sentences(args.sentences)
    ref = embed(base, tok, texts)
    if args.no_wrap:
        calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=128, seed=0)
    else:
        body = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=126, seed=0)
        n = body.shape[0]
        calib = torch.cat([torch.full((n, 1), tok.cls_token_id), body, torch.full((n, 1), tok.sep_token_id)], 1)
    rows = []
    for name in args.methods.split(","):
        model = copy.deepcopy(base)
        method = build_method(name, LowRank(reduction=args.reduction))
        t0 = time.perf_counter()
        assign = prepare_assign(model, adapter, {n: method for n in names}, calib)
        run_compression(model, adapter, assign, calib, progress=False, measure_error=False)
        secs = time.perf_counter() - t0
        cos = torch.nn.functional.cosine_similarity(embed(model, tok, texts).double(), ref.double(), dim=-1)
        dense = stored = 0
        for n in names:
            mod = model.get_submodule(n)
            cw = getattr(mod, "compressed", None)
            dense += mod.weight.numel() if cw is None else cw.numel
            stored += mod.weight.numel() if cw is None else sum(t.numel() for t in cw.tensors().values())
        row = {"method": name, "reduction_target": args.reduction, "param_reduction": 1 - stored / dense,
               "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "sentences": len(texts), "compress_s": secs,
               "calib": f"{args.calib_samples}x128 {'bare' if args.no_wrap else '[CLS]+126+[SEP]'}",
               "dense_linears": sum(1 for n in names if getattr(model.get_submodule(n), "compressed", None) is None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(args.json).read_text())["rows"] if Path(args.json).exists() else []
    keep = [r for r in old if (r["method"], r.get("calib")) not in {(x["method"], x["calib"]) for x in rows}]
    Path(args.json).write_text(json.dumps({"machine": "2-core CPU (this dev machine)", "rows": keep + rows}, indent=1))
    print(f"\nall-MiniLM-L6-v2, {len(texts)} sentences of wiki.test.raw, calibration {args.calib_samples}x128\n")
    print("| method | linear params removed | dense linears | mean cosine | min cosine | compress s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} lowrank:{args.reduction:g} | {r['param_reduction']:.1%} | {r['dense_linears']} | {r['cos_mean']:.4f} | "
              f"{r['cos_min']:.4f} | {r['compress_s']:.1f} |")


if __name__ == "__main__":
    main()
