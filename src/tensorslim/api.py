"""The public verbs: load_model, calibration_data, compress, evaluate (save/load/export live in tensorslim.io).

```python
import tensorslim as ts
model, tok = ts.load_model("smollm2-135m")
data = ts.calibration_data(tok, "valid.txt", samples=128, seq_len=512, seed=0)
result = ts.compress(model, ts.RTN(format=ts.IntGroup(bits=4, group_size=64)), data)
report = ts.evaluate(model, tok, "test.txt", baseline=base, layers=result.layers)
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from .calib.data import calibration_data
from .calib.runner import LayerResult, run_compression
from .errors import ConfigError
from .eval.lm import evaluate_lm
from .eval.report import LayerReport, Report
from .eval.text import read_text, tokenize_text
from .formats.module import CompressedLinear
from .methods.base import Compensator, Method
from .models import get_adapter, load_model
from .plan.rules import Plan

log = logging.getLogger(__name__)

__all__ = ["CompressionResult", "calibration_data", "compress", "evaluate", "load_model", "model_size"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionResult:
    layers: tuple[LayerResult, ...]
    seconds: float
    bits_per_weight: float  # over every block linear: compressed ones at their stored bytes, the rest at their dtype
    model_bits_per_weight: float  # over every parameter of the model (embeddings, norms, head; tied ones once)

    def layer_reports(self) -> tuple[LayerReport, ...]:
        return tuple(
            LayerReport(name=r.name, format=r.format, numel=r.numel, bits_per_weight=r.bits_per_weight,
                        relative_error=r.relative_error, method=r.method, seconds=r.seconds)
            for r in self.layers
        )


def model_size(model: nn.Module, adapter=None) -> tuple[float, float]:
    """``(bits per weight of the block linears, bits per weight of the whole model)``, counting every stored byte."""
    adapter = adapter or get_adapter(model)
    lin_bytes = lin_numel = 0
    # every linear inside the blocks, found by type (robust to runtime wrappers around them)
    for m in adapter.get_blocks(model).modules():
        if isinstance(m, CompressedLinear):
            lin_bytes += m.compressed.nbytes
            lin_numel += m.compressed.numel
        elif isinstance(m, nn.Linear):
            lin_bytes += m.weight.numel() * m.weight.element_size()
            lin_numel += m.weight.numel()
    total_bytes = total_numel = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            total_bytes += m.compressed.nbytes
            total_numel += m.compressed.numel
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        total_bytes += p.numel() * p.element_size()
        total_numel += p.numel()
    return 8.0 * lin_bytes / max(lin_numel, 1), 8.0 * total_bytes / max(total_numel, 1)


def _shape(m: nn.Module) -> tuple[int, int]:
    return (m.out_features, m.in_features)


def compress(
    model: nn.Module,
    method: Method | Plan,
    data: torch.Tensor | None = None,
    *,
    ignore: Sequence[str] = (),
    compensate: Compensator | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **runner_options,
) -> CompressionResult:
    """Compress ``model`` in place with one method (or a :class:`Plan`) on calibration ``data`` (``[n, seq]`` ids).

    lm_head and embeddings are not block linears and stay dense; ``ignore`` patterns keep more layers dense.
    """
    adapter = get_adapter(model)
    plan = method if isinstance(method, Plan) else Plan.uniform(method, ignore=ignore)
    if not isinstance(plan, Plan):
        raise ConfigError(f"compress takes a Method or a Plan, got {type(method).__name__}")
    names = adapter.linear_names(model)
    shapes = {n: _shape(model.get_submodule(n)) for n in names}
    assign = plan.resolve(names, shapes)
    t0 = time.perf_counter()
    if any(m is not None and (hasattr(m, "resolve") or hasattr(m, "with_fisher")) for m in assign.values()):
        # whole-model steps before the block loop: global rank allocation (WeLore), the Fisher pass (FWSVD)
        from .calib.fisher import prepare_assign

        assign = prepare_assign(model, adapter, assign, data, device=device)
    if any(m is not None and hasattr(m, "with_gradients") for m in assign.values()):
        # M-FAC: per-sample gradients of the dense model, bound to each layer's method
        from .calib.gradients import prepare_mfac
        from .errors import CalibrationError

        if data is None:
            raise CalibrationError("mfac needs calibration text for its gradient pass; give --calib FILE")
        assign = prepare_mfac(model, assign, data)
    layers = run_compression(model, adapter, assign, data, compensate=compensate, device=device,
                             batch_size=batch_size, progress=progress, **runner_options)
    seconds = time.perf_counter() - t0
    bpw, model_bpw = model_size(model, adapter)
    return CompressionResult(layers=tuple(layers), seconds=seconds, bits_per_weight=bpw, model_bits_per_weight=model_bpw)


def evaluate(
    model: nn.Module,
    tokenizer=None,
    text: str | os.PathLike[str] | torch.Tensor | None = None,
    *,
    baseline: nn.Module | None = None,
    max_tokens: int | None = 32768,
    window: int = 2048,
    batch_size: int = 1,
    layers: Sequence[LayerReport] = (),
    text_label: str | None = None,
    extra: dict | None = None,
) -> Report:
    """Perplexity (and KL / top-1 against ``baseline``) on ``text`` (a path, or already-tokenized ids)."""
    if text is None:
        raise ConfigError("evaluate needs text: a path to a text file or a tensor of token ids")
    if isinstance(text, torch.Tensor):
        tokens = text.reshape(-1)[:max_tokens] if max_tokens else text.reshape(-1)
        label = text_label or f"{tokens.numel()} given tokens"
    else:
        if tokenizer is None:
            raise ConfigError("evaluate needs the tokenizer to tokenize a text file")
        tokens = tokenize_text(tokenizer, read_text(text), max_tokens)
        label = text_label or f"file:{text} (first {tokens.numel()} tokens)"
    device = next(model.parameters()).device
    res = evaluate_lm(model, tokens, baseline=baseline, window=window, batch_size=batch_size, device=device)
    bpw, model_bpw = model_size(model)
    ex = {"model_bits_per_weight": model_bpw, "window": window, **(extra or {})}
    return Report(
        perplexity=res.perplexity, kl_mean=res.kl_mean, kl_p99=res.kl_p99, top1_agreement=res.top1_agreement,
        bits_per_weight=bpw, tokens_evaluated=res.tokens_evaluated, seconds=res.seconds, layers=tuple(layers),
        text=label, extra=ex,
    )
