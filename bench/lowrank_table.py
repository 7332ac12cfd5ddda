"""Low-rank quality table on SmolLM2-135M: EoRA on a 3-bit GPTQ base, WeLore vs uniform ranks, whitened vs plain SVD.

To fit a 2-core machine the expensive parts are shared between rows (same math as the methods, computed once):
- low-rank rows: one Gram pass on the *dense* model (statistics from uncompressed activations, SVD-LLM style; not
  the runner's sequential re-forwarding), one full SVD per matrix of W (plain) and of W L (whitened, H = L L^T);
  every (rule, target) row then truncates those SVDs at the ranks ``allocate_ranks`` gives;
- EoRA rows: one sequential GPTQ run through the runner, recording each layer's (W, W_c, X^T X); each rank then
  applies ``EoRA(rank).apply`` to the recorded triples (so the Gram is from the GPTQ model without earlier-layer
  corrections: a documented deviation from EoRA's fully sequential calibration).
Each row: perplexity, KL and top-1 agreement vs the base model on the first ``--eval-tokens`` tokens of
wiki.test.raw (windows of 2048), bits/weight of the block linears and the fraction of their parameters removed.

    python bench/lowrank_table.py --eval-tokens 4096 --calib-samples 16
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from tensorslim.api import model_size
from tensorslim.calib.data import calibration_data
from tensorslim.calib.fisher import dense_grams
from tensorslim.calib.runner import run_compression
from tensorslim.eval.cache import CachedBaseline
from tensorslim.eval.lm import evaluate_lm
from tensorslim.eval.text import read_text, tokenize_text
from tensorslim.formats import CompressedLinear, IntGroup, LowRank, LowRankWeight
from tensorslim.methods import Compensator, build_method
from tensorslim.methods.eora import EoRA
from tensorslim.methods.lowrank import whitening
from tensorslim.methods.welore import allocate_ranks, singular_values
from tensorslim.models import get_adapter, load_model

EVAL = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
CALIB = "/work/shared/data/wikitext-2/valid.txt"
LABELS = {"uniform": "uniform", "welore": "WeLore", "energy": "energy", "error": "error-greedy"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recorder(Compensator):
    """Keeps (W, W_c, stats) per layer and returns W_c unchanged (bench only)."""

    name = "record"
    requires = frozenset()
    store: dict = dataclasses.field(default_factory=dict, compare=False)

    def apply(self, w, compressed, stats, *, layer="<layer>"):
        self.store[layer] = (w.clone(), compressed, stats)
        return compressed


def swap(model, name, cw):
    parent, _, child = name.rpartition(".")
    lin = model.get_submodule(name)
    setattr(model.get_submodule(parent), child, CompressedLinear(cw, getattr(lin, "bias", None)))


def stored_fraction(model, names) -> float:
    dense = stored = 0
    for n in names:
        cw = getattr(model.get_submodule(n), "compressed", None)
        if cw is None:
            k = model.get_submodule(n).weight.numel()
            dense, stored = dense + k, stored + k
        else:
            dense += cw.numel
            stored += sum(t.numel() for t in cw.tensors().values())
    return 1.0 - stored / dense


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="eora,lowrank")
    ap.add_argument("--targets", default="0.2,0.4")
    ap.add_argument("--eora-ranks", default="16,32,64")
    ap.add_argument("--rules", default="uniform,welore,error",
                    help="allocation rules of the low-rank rows, each optionally RULE:weight or RULE:whitened (the "
                         "spectra it reads; default: whitened for welore/energy/error with whitened factors, else weight)")
    ap.add_argument("--factors", default="svd,svd-whitened", help="factor kinds of the low-rank rows")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="runs/lowrank_table.json")
    ap.add_argument("--reference-cache", default="runs/ref_logits_smollm2",
                    help="folder of the base model's logits per window (keyed by model fingerprint and token ids)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model("smollm2-135m")
    adapter = get_adapter(base)
    names = adapter.linear_names(base)
    eval_ids = tokenize_text(tok, read_text(EVAL), args.eval_tokens)
    calib = calibration_data(tok, CALIB, samples=args.calib_samples, seq_len=args.calib_seq, seed=0)
    cached = CachedBaseline(base, directory=args.reference_cache)  # from disk, one window in memory
    rows: list[dict] = []
    meta = {"eval_tokens": int(eval_ids.numel()), "calib": f"{args.calib_samples}x{args.calib_seq}",
            "machine": "2-core CPU (this dev machine)"}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(label, model, extra=None):
        t0 = time.perf_counter()
        ev = evaluate_lm(model, eval_ids, baseline=cached)
        row = {"label": label, "perplexity": ev.perplexity, "kl_mean": ev.kl_mean, "top1": ev.top1_agreement,
               "bits_per_weight": model_size(model, adapter)[0], "param_reduction": stored_fraction(model, names),
               "eval_s": time.perf_counter() - t0, **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    parts = args.parts.split(",")
    if "lowrank" in parts:
        weights = {n: base.get_submodule(n).weight.detach().float() for n in names}
        t0 = time.perf_counter()
        grams = dense_grams(base, calib, names)  # X^T X / N of the dense model, as prepare_assign collects it
        t_gram = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain, white = {}, {}
        for n, w in weights.items():
            plain[n] = torch.linalg.svd(w, full_matrices=False) if "svd" in args.factors.split(",") else None
            wh = whitening(grams[n], layer=n)
            u2, s2, vh2 = torch.linalg.svd(wh.right(w.double()).float(), full_matrices=False)
            white[n] = (u2, s2, wh.unright(vh2.double()).float())
        del grams
        t_svd = time.perf_counter() - t0
        sv = {n: plain[n][1] for n in names} if plain[names[0]] is not None else singular_values(weights)
        print(f"grams {t_gram:.0f}s, SVDs {t_svd:.0f}s", flush=True)
        for target in (float(x) for x in args.targets.split(",")):
            for spec_rule in args.rules.split(","):
                rule, _, source = spec_rule.partition(":")
                for kind, fac in (("svd", plain), ("svd-whitened", white)):
                    if kind not in args.factors.split(","):
                        continue
                    # the spectra a rule reads: the whitened matrices' (what whitened SVD truncates; the
                    # welore-whitened default) or the weights' (data-free, the paper's)
                    src = source or ("whitened" if kind == "svd-whitened" and rule != "uniform" else "weight")
                    spec = {n: white[n][1] for n in names} if src == "whitened" else sv
                    ranks = allocate_ranks(weights, target, rule, spectra=spec)
                    model = copy.deepcopy(base)
                    for n, k in ranks.items():
                        if k is None:
                            continue
                        u, s, vh = fac[n]
                        root = s[:k].sqrt()
                        swap(model, n, LowRankWeight.from_factors(LowRank(rank=k), u[:, :k] * root, root[:, None] * vh[:k]))
                    label = f"{kind} {LABELS[rule]} ranks{'' if rule == 'uniform' else f' ({src} spectra)'}, target {target:.0%}"
                    record(label, model, {"rule": rule, "spectra": src, "target": target, "factor": kind,
                                          "dense_layers": sum(1 for k in ranks.values() if k is None)})
                    del model
    if "eora" in parts:
        rec = Recorder()
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        run_compression(model, adapter, {n: build_method("gptq", IntGroup(bits=3, group_size=64)) for n in names},
                        calib, compensate=rec, progress=False, measure_error=False)
        record("gptq int3:g64", model, {"compress_s": time.perf_counter() - t0})
        for r in (int(x) for x in args.eora_ranks.split(",")):
            t0 = time.perf_counter()
            for n in names:
                w, cw, st = rec.store[n]
                swap(model, n, EoRA(rank=r).apply(w, cw, st, layer=n))
            record(f"gptq int3:g64 + eora:r{r}", model, {"compress_s": time.perf_counter() - t0})
        del model, rec
    print(f"\nSmolLM2-135M, {meta['eval_tokens']} eval tokens, calibration {meta['calib']}, {meta['machine']}\n")
    print("| configuration | ppl | KL | top-1 | bits/weight (linears) | linear params removed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['perplexity']:.2f} | {r['kl_mean']:.4f} | {r['top1']:.3f} | "
              f"{r['bits_per_weight']:.3f} | {r['param_reduction']:.1%} |")


if __name__ == "__main__":
    main()
