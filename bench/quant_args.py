"""Command-line arguments shared by the model-level quantization benchmarks (quant_table.py, quant_table_shared.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TS_DATA", ROOT.parent / "shared" / "data"))


def _val(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def parse_quant_args(default_json: str, *, sym: bool = False,
                     extra=None) -> tuple[argparse.Namespace, dict[str, dict]]:  # noqa: ANN001 - parser hook
    """Parse the common flags; returns the arguments and the per-method options from ``--opt method.key=value``.

    ``extra(parser)`` may add script-specific flags."""
    ap = argparse.ArgumentParser()
    if extra is not None:
        extra(ap)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rtn,rtn-imatrix,hqq,gptq,quantease,quantease-outliers")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group", default="64")
    if sym:
        ap.add_argument("--sym", action="store_true")
    ap.add_argument("--calib", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--eval-text", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--no-kl", action="store_true", help="skip the baseline (faster, no KL / top-1)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reference-cache", default=None,
                    help="folder for the base model's logits (reused across runs; default: in memory only)")
    ap.add_argument("--opt", action="append", default=[], help="method.key=value")
    ap.add_argument("--compensate", default="none",
                    help="comma-separated second stages per row, e.g. none,eora:r16,eora:r32 (quant_table.py)")
    ap.add_argument("--calib-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=default_json)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts: dict[str, dict] = {}
    for o in args.opt:
        k, v = o.split("=", 1)
        m, key = k.split(".", 1)
        opts.setdefault(m, {})[key] = _val(v)
    return args, opts
