"""Shared test helpers: compress a tiny model's linears into any registered format (generic encoder lookup)."""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from tensorslim.formats import CompressedLinear, Format, Sum, SumWeight, parse_format
from tensorslim.stats import LayerStats

# One small example spec per format family (family = Format.family); a new family needs one entry here.
EXAMPLES: dict[str, list[str]] = {
    "int": ["int4:g32", "int3:g32:sym", "int8:pc", "int2:g32", "int4:g32:act", "int5:g32:sym"],
    "bcq": ["bcq3:g32"],
    "bipolar": ["bipolar2:g32"],
    "fp8": ["fp8:e4m3", "fp8:e5m2:g32"],
    "mxfp": ["mxfp4", "mxfp8"],
    "nvfp": ["nvfp4"],
    "nf": ["nf4:g32"],
    "ternary": ["ternary:g32"],
    "lowrank": ["lowrank:r8"],
    "kronecker": ["kron:t2"],
    "monarch": ["monarch:b4:r2"],
    "sum": ["int4:g32+lowrank:r4"],
    "outliers": ["int3:g32+outliers:0.05"],
    "sparse": ["sparse:2:4", "sparse:2:4+int4:g32", "sparse:0.5"],
    "groupsparse": ["groupsparse:0.5:g32"],
    "kquant": ["q4_k", "q6_k"],  # rows must be multiples of 256: use wide_llama()
}


def wide_llama(seed: int = 0) -> nn.Module:
    """A tiny Llama whose linears take 256-multiple rows (hidden 256, intermediate 512), for the k-quant formats."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def _stats(inp: int, seed: int) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, inp, generator=g)
    return LayerStats(n_tokens=256, gram=x.T @ x, norms=(x * x).sum(0), absmax=x.abs().amax(0),
                      fisher=torch.rand(1, inp, generator=g))


def encode(w: torch.Tensor, fmt: Format, seed: int = 0):
    """A compressed weight of ``w`` in ``fmt``: the format module's ``quantize_*``/``encode_*`` function, else a method
    from the registry that produces this format type, with random statistics."""
    if isinstance(fmt, Sum):
        base = encode(w, fmt.base, seed)
        extra = encode(w - base.decode(), fmt.extra, seed)
        return SumWeight(format=fmt, shape=tuple(w.shape), base=base, extra=extra)
    if type(fmt).__name__ == "IntGroup" and fmt.act_order:
        from tensorslim.formats import quantize_rtn

        perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
        return quantize_rtn(w, fmt, perm)
    if type(fmt).__name__ in ("Sparse", "GroupSparse"):
        return _encode_sparse(w, fmt)
    if type(fmt).__name__ == "SparseOutliers":
        from tensorslim.formats.outliers import encode_outliers

        return encode_outliers(fmt, w, w.abs().topk(fmt.per_row(w.shape[1]), dim=1).indices)
    module = sys.modules[type(fmt).__module__]
    for name, fn in vars(module).items():
        if name.startswith("quantize_") and callable(fn):
            params = inspect.signature(fn).parameters
            ann = params["fmt"].annotation if "fmt" in params else None
            if ann in (type(fmt).__name__, type(fmt)):
                return fn(w, fmt)
    from tensorslim.methods.registry import _METHODS

    for factory in _METHODS.values():
        types = getattr(factory, "format_types", ())
        if types and isinstance(fmt, types):
            stats = _stats(w.shape[1], seed)
            method = factory(format=fmt)
            if hasattr(method, "apply"):
                return method.apply(w, stats, layer="test")
    raise AssertionError(f"no encoder for {fmt.spec()}: add a quantize_* function or a method producing it")


def _encode_sparse(w: torch.Tensor, fmt: Format):
    from tensorslim.formats import sparse as sp

    out, inp = w.shape
    if isinstance(fmt, sp.GroupSparse):
        norms = w.reshape(out, inp // fmt.group_size, fmt.group_size).norm(dim=-1)
        k = norms.numel() - sp.prune_count(norms.numel(), fmt.sparsity)
        gm = torch.zeros(norms.numel(), dtype=torch.bool)
        gm[norms.flatten().argsort(descending=True)[:k]] = True
        return sp.encode_group_sparse(fmt, w, gm.reshape(norms.shape))
    if fmt.is_nm:
        a = w.abs().reshape(out, inp // fmt.m, fmt.m)
        idx = a.argsort(-1, descending=True)[..., : fmt.n]
        mask = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True).reshape(out, inp)
    else:
        k = w.numel() - sp.prune_count(w.numel(), fmt.sparsity)
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[w.abs().flatten().argsort(descending=True)[:k]] = True
        mask = mask.reshape(out, inp)
    return sp.encode_sparse(fmt, w, mask)


def compress_linears(model: nn.Module, spec: str, *, skip: tuple[str, ...] = ("lm_head",), seed: int = 0,
                     under: str = "") -> int:
    """Replace every nn.Linear (except ``skip``, only below module ``under``) by a CompressedLinear in ``spec``."""
    fmt = parse_format(spec)
    n = 0
    for name, mod in list(model.named_modules()):
        if not name.startswith(under):
            continue
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and cname not in skip:
                w = child.weight.detach().float()
                if fmt.supports(tuple(w.shape)) is not None:
                    continue
                cw = encode(w, fmt, seed + n)
                setattr(mod, cname, CompressedLinear.from_linear(child, cw, method="test"))
                n += 1
    return n


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
