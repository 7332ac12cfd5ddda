"""Why does the Hadamard rotation make weight-only int4 RTN worse on SmolLM2? Per-group layer errors, plain vs rotated.

    python bench/rotation_diag.py [--samples 4] [--json runs/rotation_diag.json]

For every third block: the activation-weighted relative error ``||X (W - W_hat)^T||^2 / ||X W^T||^2`` of int4:g64 RTN
per linear group (inputs: 1,024 random tokens of ``samples`` x 512 wikitext-2 valid tokens, captured from each model),
the plain relative weight error for int4:g32 / int4:g64, and the spread of the norm gains vs the normalized inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from tensorslim.calib.data import calibration_data
from tensorslim.formats import parse_format
from tensorslim.methods import build_method
from tensorslim.models.adapter import get_adapter
from tensorslim.models.sources import load_model
from tensorslim.stats import LayerStats
from tensorslim.transforms.flatquant import capture_inputs
from tensorslim.transforms.hadamard import apply_rotation

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
GROUPS = ("q/k/v", "o_proj", "gate/up", "down_proj")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--json", default="runs/rotation_diag.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    plain, tok = load_model("smollm2-135m")
    adapter = get_adapter(plain)
    rotated = apply_rotation(copy.deepcopy(plain), get_adapter(plain), "hadamard", seed=0)
    data = calibration_data(tok, str(CALIB), samples=args.samples, seq_len=512, seed=0)
    blocks = range(0, len(adapter.get_blocks(plain)), 3)
    out: dict = {"layer_error": {}, "weight_error": {}, "gains": []}
    for label, model in (("plain", plain), ("hadamard", rotated)):
        acts = capture_inputs(model, get_adapter(model), data, tokens=1024, batch_size=4)
        layers = get_adapter(model).get_blocks(model)
        for spec in ("int4:g32", "int4:g64"):
            method = build_method("rtn", parse_format(spec))
            errs, werrs = {g: [] for g in GROUPS}, []
            for i in blocks:
                for g, names in enumerate(adapter.linear_groups):
                    x = acts[i][g].double()
                    num = den = 0.0
                    for n in names:
                        w = layers[i].get_submodule(n).weight.detach().float()
                        dw = method.apply(w, LayerStats(), layer=n).decode().double() - w.double()
                        num += float((x @ dw.T).pow(2).sum())
                        den += float((x @ w.double().T).pow(2).sum())
                        werrs.append(float(dw.norm() / w.double().norm()))
                    errs[GROUPS[g]].append(num / den)
            out["weight_error"][f"{label} {spec}"] = sum(werrs) / len(werrs)
            if spec == "int4:g64":
                out["layer_error"][label] = {g: sum(v) / len(v) for g, v in errs.items()}
        if label == "plain":
            for i in blocks:
                for g, norm in ((0, "input_layernorm"), (2, "post_attention_layernorm")):
                    gain = layers[i].get_submodule(norm).weight.detach().float()
                    rms = (acts[i][g] / gain).pow(2).mean(0).sqrt()
                    corr = float(torch.corrcoef(torch.stack([gain.abs().log(), rms.log()]))[0, 1])
                    out["gains"].append({"block": i, "norm": norm, "gain_max_over_median": float(gain.abs().max() / gain.abs().median()),
                                         "input_rms_max_over_median": float(rms.max() / rms.median()), "corr_log": corr})
    print("| linear group | plain | Hadamard-rotated |\n|---|---|---|")
    for g in GROUPS:
        print(f"| {g} | {out['layer_error']['plain'][g]:.5f} | {out['layer_error']['hadamard'][g]:.5f} |")
    print("relative weight error:", {k: round(v, 5) for k, v in out["weight_error"].items()})
    for r in out["gains"]:
        print(r)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
