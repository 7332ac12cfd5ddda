"""Save / load / export speed of SmolLM2-135M compressed at 4 bits (RTN int4:g64 on every block linear).

Also checks on 256 tokens of wiki.test.raw: load gives bit-identical logits; the GGUF export re-imported through
transformers' GGUF loader gives identical logits (the mapping is exact), and so does the dense HF export.
Usage: python bench/io_speed.py [--spec int4:g64] [--tokens 256]. Prints a markdown table, writes runs/io_speed.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tensorslim.formats import CompressedLinear, parse_format, quantize_rtn
from tensorslim.io import export, load, save
from tensorslim.models import get_adapter, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="int4:g64")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model("smollm2-135m")
    adapter = get_adapter(model)
    fmt = parse_format(args.spec)
    for name in adapter.linear_names(model):
        lin = model.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, CompressedLinear.from_linear(lin, quantize_rtn(lin.weight.float(), fmt)))
    text = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw").read_text().replace("\r\n", "\n")[:20000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, : args.tokens]
    ref = model(ids).logits
    out = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter(); save(model, d / "ck", tokenizer=tok); out["save_s"] = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (d / "ck").rglob("*") if p.is_file())
        t = time.perf_counter(); back, _ = load(d / "ck"); out["load_s"] = time.perf_counter() - t
        out["load_bit_identical"] = bool(torch.equal(back(ids).logits, ref))
        out["checkpoint_mb"] = size / 2**20
        for target, path in (("gguf", d / "m.gguf"), ("compressed-tensors", d / "ct"), ("hf", d / "hf")):
            t = time.perf_counter(); export(model, target, path, tokenizer=tok); out[f"export_{target}_s"] = time.perf_counter() - t
        from transformers import AutoModelForCausalLM

        g = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="m.gguf", dtype=torch.float32).eval()
        out["gguf_reimport_max_abs_logit_diff"] = float((g(ids).logits - ref).abs().max())
        h = AutoModelForCausalLM.from_pretrained(str(d / "hf"), dtype=torch.float32).eval()
        out["hf_reimport_max_abs_logit_diff"] = float((h(ids).logits - ref).abs().max())
    out.update(spec=args.spec, tokens=args.tokens, threads=torch.get_num_threads())
    Path("runs").mkdir(exist_ok=True)
    Path("runs/io_speed.json").write_text(json.dumps(out, indent=2))
    print("| metric | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
