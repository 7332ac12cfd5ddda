"""The runner: the only code that runs the model, hooks layers and moves memory.

Sequential block-by-block compression (GPTQ / llm-compressor's "sequential" pipeline):

1. capture the inputs (hidden states and keyword arguments) of block 0 for every calibration batch;
2. for each block: hook the linears that get a method, forward the cached inputs once to accumulate the union of the
   statistics their methods (and the compensator, and the error report) need; solve every linear (a pure method call);
   swap in :class:`~tensorslim.formats.CompressedLinear`; forward the cached inputs again through the *compressed*
   block, so the next block is calibrated on what it will really see.

All linears of a block are calibrated in one pass on the uncompressed block (not one pass per sub-sequential group),
which halves the forwards on CPU; linears of one group that read the same input (q/k/v, gate/up) share one
accumulator. Memory: one block on ``device`` plus the cached activations of the calibration batches (on CPU between
blocks only when ``offload`` is set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, NumericalError
from ..formats.module import CompressedLinear
from ..methods.base import Compensator, Method
from ..stats import LayerStats, Stat, new_accumulators, stats_from_accumulators
from .progress import Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerResult:
    name: str
    method: str
    format: str
    numel: int
    nbytes: int
    relative_error: float | None
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel


@dataclasses.dataclass
class _Cached:
    hidden: torch.Tensor
    kwargs: dict[str, Any]


class _Stop(Exception):
    pass


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, adapter, batches: torch.Tensor, *, batch_size: int, device) -> list[_Cached]:
    """Run the model up to block 0 on each batch; keep block 0's hidden states and keyword arguments."""
    block0 = adapter.get_blocks(model)[0]
    cache: list[_Cached] = []

    def hook(_module, args, kwargs):
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw["use_cache"] = False
        cache.append(_Cached(hidden, kw))
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in batches.split(batch_size):
            try:
                if adapter.kind == "causal_lm":
                    model(input_ids=chunk.to(device), use_cache=False)
                else:
                    model(input_ids=chunk.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(cache) != len(batches.split(batch_size)):
        raise CalibrationError("block 0 was not reached for every calibration batch; is the adapter's block path right?")
    return cache


@torch.no_grad()
def forward_with_hooks(model: nn.Module, batches: torch.Tensor, batch_size: int,
                       pre_hooks: Sequence[tuple[nn.Module, Callable]]) -> None:
    """Run the whole ``model`` over ``batches`` (``[n, seq]`` token ids), ``batch_size`` rows at a time, on the
    model's device, with the forward pre-hooks ``(module, fn)`` registered for these passes only (removed after, also
    on an error). For statistics of a whole-model pass (SliceGPT's boundary covariances, WINA's thresholds)."""
    handles = [module.register_forward_pre_hook(fn) for module, fn in pre_hooks]
    try:
        dev = next(model.parameters()).device
        for i in range(0, batches.shape[0], batch_size):
            model(batches[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.inference_mode()
def run_compression(
    model: nn.Module,
    adapter,
    assign: Mapping[str, Method | None],
    batches: torch.Tensor | None,
    *,
    compensate: Compensator | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    measure_error: bool = True,
    progress: bool = True,
    start_block: int = 0,
    initial_inputs: Sequence[_Cached] | None = None,
    on_block_done: Callable[[int, nn.Module, list[_Cached]], None] | None = None,
    calib_dtype: str = "float32",
) -> list[LayerResult]:
    """Compress every linear named in ``assign`` (full dotted names; ``None`` keeps a layer dense).

    ``batches`` (``[n, seq_len]`` token ids) may be ``None`` only when no method needs statistics; then layers are
    solved directly and the relative error is the weight-space (Frobenius) one. ``calib_dtype="bfloat16"`` runs the
    calibration forwards under bf16 autocast and the Gram products in bf16 (fp32 sums): ~3x faster on CPUs with bf16
    units, an approximation of the statistics that methods then solve exactly (documented in docs/calibration.md). ``on_block_done`` is called after each
    block with the inputs of the next block (for resumable runs); ``start_block``/``initial_inputs`` resume there.
    """
    blocks = adapter.get_blocks(model)
    prefix = adapter.blocks + "."
    device = torch.device(device) if device is not None else next(model.parameters()).device
    unknown = set(k for k, v in assign.items() if v is not None) - set(adapter.linear_names(model))
    if unknown:
        raise CalibrationError(f"no block linear named {sorted(unknown)[:5]} in this model")
    needs_data = any(m is not None and m.requires for m in assign.values()) or bool(compensate and compensate.requires)
    if needs_data and batches is None:
        raise CalibrationError("a method needs calibration statistics; give calibration text (--calib FILE)")
    if calib_dtype not in ("float32", "bfloat16"):
        raise CalibrationError(f"calib_dtype must be 'float32' or 'bfloat16', got {calib_dtype!r}")
    fast = calib_dtype == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast else contextlib.nullcontext()
    results: list[LayerResult] = []
    bar = Progress(total=len(blocks) - start_block, label="compress", enabled=progress)

    cache: list[_Cached] | None = None
    if batches is not None:
        if initial_inputs is not None:
            cache = list(initial_inputs)
        else:
            cache = capture_block_inputs(model, adapter, batches, batch_size=batch_size, device=device)

    with bar:
        for bi in range(start_block, len(blocks)):
            block = blocks[bi]
            linears = adapter.block_linears(block)
            targets = {rel: assign.get(f"{prefix}{bi}.{rel}") for rel in linears}
            targets = {rel: m for rel, m in targets.items() if m is not None}
            if targets:
                layer_stats = (
                    _collect(block, adapter, linears, targets, cache, compensate, measure_error, f"{prefix}{bi}.",
                             autocast, torch.bfloat16 if fast else None)
                    if cache is not None
                    else {rel: LayerStats() for rel in targets}
                )
                for rel, method in targets.items():
                    name = f"{prefix}{bi}.{rel}"
                    results.append(_solve(block, rel, name, linears[rel], method, layer_stats[rel], compensate))
                    bar.status(name)
            if cache is not None:
                with autocast:
                    cache = [_Cached(_first_output(block(c.hidden, **c.kwargs)).to(c.hidden.dtype), c.kwargs) for c in cache]
                if not all(torch.isfinite(c.hidden).all() for c in cache):
                    raise NumericalError(f"block {bi} produced non-finite activations after compression")
            if on_block_done is not None:
                on_block_done(bi, model, cache or [])
            bar.advance()
    return results


def _needed(method: Method, compensate: Compensator | None, measure_error: bool) -> set[Stat]:
    need = set(method.requires)
    if compensate is not None:
        need |= set(compensate.requires)
    if measure_error:
        need.add(Stat.GRAM)
    return need


def _collect(block, adapter, linears, targets, cache, compensate, measure_error, prefix, autocast, matmul_dtype) -> dict[str, LayerStats]:
    """One forward of the uncompressed block over all batches, accumulating each target's statistics."""
    needs = {rel: _needed(m, compensate, measure_error) for rel, m in targets.items()}
    # Linears of one sub-sequential group read the same tensor: one accumulator per group (checked, not assumed).
    owner: dict[str, str] = {}
    for group in adapter.linear_groups:
        members = [r for r in group if r in targets]
        for r in members:
            owner[r] = members[0]
    for rel in targets:
        owner.setdefault(rel, rel)
    union: dict[str, set[Stat]] = {}
    for rel, o in owner.items():
        union.setdefault(o, set()).update(needs[rel])
    accs = {o: new_accumulators(s, linears[o].in_features, device=cache[0].hidden.device, matmul_dtype=matmul_dtype)
            for o, s in union.items()}
    seen_inputs: dict[str, torch.Tensor] = {}
    first = [True]

    def make_hook(rel: str):
        def hook(_mod, inp, _out):
            x = inp[0]
            if first[0]:
                seen_inputs[rel] = x
            if owner[rel] == rel:
                for acc in accs[rel].values():
                    acc.update(x.detach(), prefix + rel)

        return hook

    handles = [linears[rel].register_forward_hook(make_hook(rel)) for rel in targets]
    try:
        for c in cache:
            with autocast:
                block(c.hidden, **c.kwargs)
            if first[0]:
                first[0] = False
                for rel, o in owner.items():
                    if o != rel and seen_inputs.get(rel) is not seen_inputs.get(o):
                        raise CalibrationError(
                            f"{prefix}{rel} and {prefix}{o} are grouped by the adapter but read different inputs; "
                            "fix the adapter's linear_groups"
                        )
                seen_inputs.clear()
    finally:
        for h in handles:
            h.remove()
    shared = {o: stats_from_accumulators(a) for o, a in accs.items()}
    return {rel: shared[owner[rel]] for rel in targets}


def _solve(block, rel, name, linear: nn.Linear, method: Method, stats: LayerStats, compensate) -> LayerResult:
    from ..eval.lm import layer_relative_error

    t0 = time.perf_counter()
    w = linear.weight.detach().float()
    cw = method.apply(w, stats, layer=name)
    if compensate is not None:
        cw = compensate.apply(w, cw, stats, layer=name)
    w_hat = cw.decode(torch.float32)
    if not torch.isfinite(w_hat).all():
        raise NumericalError(f"layer {name!r}: {method.describe()} produced non-finite weights")
    err = layer_relative_error(w, w_hat, stats.gram) if (stats.gram is not None or not stats.n_tokens) else None
    _set_module(block, rel, CompressedLinear.from_linear(linear, cw, method=method.name))
    desc = method.name + (f"+{compensate.describe()}" if compensate is not None else "")
    return LayerResult(
        name=name,
        method=desc,
        format=cw.format.spec(),
        numel=cw.numel,
        nbytes=cw.nbytes,
        relative_error=err,
        seconds=time.perf_counter() - t0,
    )
