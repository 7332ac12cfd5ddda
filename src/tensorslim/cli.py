"""The command line: a thin wrapper over :mod:`tensorslim.api` (and io / transforms for their commands)."""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import TensorslimError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress neural-network weight matrices without retraining.")
console = Console(stderr=False)
err_console = Console(stderr=True)

_MODEL_HELP = "alias (smollm2-135m, minilm-l6), Hugging Face folder or hub id, .gguf file, or tensorslim checkpoint folder"


def _fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(code=2)


_CACHE_HELP = ("folder that keeps the base model's logits (about 400 MB per 2,048-token window) so later runs on the "
               "same text skip the base model's forward; keyed by the token ids and a fingerprint of the base weights")


def _cached(base, directory):  # noqa: ANN001, ANN202
    """The base model, or a :class:`CachedBaseline` over it when a cache folder is given."""
    if base is None or directory is None:
        return base
    from .eval import CachedBaseline

    return CachedBaseline(base, directory=directory)


def _apply_flatquant(model, fmt, act: str | None, data, seed: int, batch_size: int) -> None:
    """FlatQuant transforms fitted for the weight grid of ``fmt`` (integer formats; int4:g64 otherwise) and ``act``."""
    from .errors import ConfigError
    from .formats.intgroup import IntGroup
    from .models import get_adapter
    from .transforms.flatquant import FlatQuantConfig, apply_flatquant

    if act not in ("int4", "int8"):
        raise ConfigError(f"--rotate flatquant fits its transforms for 4- or 8-bit activations: give --act int4 or "
                          f"--act int8 (got --act {act})")
    bits, group = (fmt.bits, fmt.group_size) if isinstance(fmt, IntGroup) else (4, 64)
    config = FlatQuantConfig(act_bits=int(act[3:]), act_clip=1.0, weight_bits=max(bits, 2), weight_group=group, seed=seed)
    t0 = time.perf_counter()
    apply_flatquant(model, get_adapter(model), data, config, batch_size=batch_size)
    console.print(f"FlatQuant transforms fitted in {time.perf_counter() - t0:.1f} s")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)] = "smollm2-135m",
    method: Annotated[str, typer.Option(help="compression method (rtn, gptq, ...; see `tensorslim methods`)")] = "rtn",
    format: Annotated[str, typer.Option("--format", "-f", help="target format, e.g. int4:g64, int3:g64:sym")] = "int4:g64",
    calib: Annotated[Optional[str], typer.Option(help="calibration text file (or a hub dataset name such as wikitext2); default: text sampled from the model")] = None,
    samples: Annotated[int, typer.Option(help="calibration samples")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sample")] = 512,
    seed: Annotated[int, typer.Option(help="seed for calibration sampling and any randomized method")] = 0,
    ignore: Annotated[Optional[list[str]], typer.Option(help="keep matching layers dense (glob or re:REGEX); repeatable")] = None,
    compensate: Annotated[Optional[str], typer.Option(help="second stage after the method, e.g. eora:r32")] = None,
    eval_text: Annotated[Optional[str], typer.Option(help="evaluation text file (never the calibration text); default: text sampled from the model")] = None,
    max_tokens: Annotated[int, typer.Option(help="evaluation tokens")] = 32768,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="skip the quality report")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the report as JSON")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write a tensorslim checkpoint folder")] = None,
    rotate: Annotated[Optional[str], typer.Option(help="transform the model first (function-preserving): hadamard, random, or flatquant (learned, fitted for --act on the calibration text)")] = None,
    act: Annotated[Optional[str], typer.Option(help="quantize activations at run time: int8, int4 or fp8")] = None,
    kv: Annotated[Optional[str], typer.Option(help="quantize the KV cache at run time: int8, int4, bfp4")] = None,
    numerics: Annotated[Optional[str], typer.Option(help="numerics mode: layercast, bf16 or lmul:m3")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run of the same command (needs -o)")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    calib_dtype: Annotated[str, typer.Option(help="float32 (exact statistics) or bfloat16 (~3x faster calibration on CPUs with bf16 units)")] = "float32",
    baseline_cache: Annotated[Optional[Path], typer.Option(help=_CACHE_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Compress MODEL with METHOD into FORMAT, then report what it cost in quality (perplexity, KL, top-1)."""
    _setup_logging(verbose)
    try:
        _compress(model, method, format, calib, samples, seq_len, seed, ignore or [], compensate, eval_text,
                  max_tokens, no_eval, json_out, output, device, batch_size, calib_dtype, resume,
                  {"rotate": rotate, "act": act, "kv": kv, "numerics": numerics}, baseline_cache)
    except TensorslimError as e:
        _fail(e)


def _compress(model_src, method_name, fmt_spec, calib, samples, seq_len, seed, ignore, compensate_spec, eval_text,
              max_tokens, no_eval, json_out, output, device, batch_size, calib_dtype, resume, modes, baseline_cache=None) -> None:
    from . import api
    from .calib.data import calibration_data, sample_from_model
    from .eval.report import Report, render
    from .formats import parse_format
    from .methods import build_method

    t_start = time.perf_counter()
    if resume and output is None:
        from .errors import ConfigError

        raise ConfigError("--resume continues a run that writes a checkpoint: give the same -o DIR as before")
    model_transform = method_name in _MODEL_TRANSFORMS
    if model_transform:
        fraction, transform_opts = _transform_spec(method_name, fmt_spec)
        if output is not None and method_name != "slicegpt":
            from .errors import ConfigError

            raise ConfigError(f"--method {method_name} sparsifies activations at run time; there is no compressed "
                              "checkpoint to write (drop -o)")
        method = None
        fmt = None
    else:
        fmt = parse_format(fmt_spec)
        method = build_method(method_name, fmt)
    comp = _parse_compensate(compensate_spec) if compensate_spec else None
    with console.status(f"loading {model_src}"):
        model, tok = api.load_model(model_src, device=device)
    base = None if no_eval else copy.deepcopy(model)
    sampled_eval = None
    with console.status("preparing calibration text"):
        if calib is not None:
            data = calibration_data(tok, calib, samples=samples, seq_len=seq_len, seed=seed)
            calib_label = f"file:{calib} ({samples} x {seq_len} tokens, seed {seed})"
        else:
            # One seeded batch of 2n sequences: the first n calibrate, the other n are the evaluation text.
            # (generation costs one forward per token position: sequences are capped at 256 tokens)
            n, seq_len = max(1, min(samples, 8)), min(seq_len, 256)
            want_eval = eval_text is None and not no_eval
            sampled = sample_from_model(model, tok, sequences=2 * n if want_eval else n, seq_len=seq_len, seed=seed,
                                        batch_size=2 * n)
            data = sampled[:n]
            sampled_eval = sampled[n:] if want_eval else None
            calib_label = f"sampled from the base model ({n} x {seq_len} tokens, seed {seed})"
    console.print(f"calibration text: {calib_label}")
    method_desc = method.to_dict() if method is not None else {"name": method_name, "format": fmt_spec}
    fingerprint = {"model": model_src, "method": method_desc, "compensate": compensate_spec, "ignore": list(ignore),
                   "data_sha256": _sha256(data), "calib_dtype": calib_dtype, "batch_size": batch_size}
    progress = _progress(model, output, fingerprint, resume) if output is not None else None
    runner_opts = {}
    if progress is not None:
        runner_opts["on_block_done"] = progress.on_block_done
        start = progress.restore(model)
        if start:
            from .calib.runner import capture_block_inputs
            from .models import get_adapter

            fresh = capture_block_inputs(model, get_adapter(model), data, batch_size=batch_size, device=device)
            runner_opts.update(start_block=start, initial_inputs=progress.initial_inputs(fresh))
            console.print(f"resuming at block {start}")
    if modes["rotate"] == "flatquant":
        _apply_flatquant(model, fmt, modes["act"], data, seed, batch_size)
    elif modes["rotate"]:
        from .models import get_adapter
        from .transforms.hadamard import apply_rotation

        apply_rotation(model, get_adapter(model), modes["rotate"], seed)
    if model_transform:
        result = _apply_model_transform(model, method_name, fraction, data, batch_size, transform_opts)
        console.print(f"{method_name} {fmt_spec} applied in {result.seconds:.1f} s")
    else:
        result = api.compress(model, method, data, ignore=ignore, compensate=comp, device=device, batch_size=batch_size,
                              calib_dtype=calib_dtype, **runner_opts)
        console.print(f"compressed {len(result.layers)} layers in {result.seconds:.1f} s; "
                      f"{result.bits_per_weight:.3f} bits per weight over the block linears")
    _apply_runtime_modes(model, modes)
    extra = {"compress_seconds": result.seconds, "calibration": calib_label, "model_bits_per_weight": result.model_bits_per_weight}
    if no_eval:
        report = Report(perplexity=None, kl_mean=None, kl_p99=None, top1_agreement=None, bits_per_weight=result.bits_per_weight,
                        tokens_evaluated=None, seconds=time.perf_counter() - t_start, layers=result.layer_reports(), extra=extra)
    else:
        base = _cached(base, baseline_cache)
        with console.status("evaluating against the base model"):
            if eval_text is not None:
                report = api.evaluate(model, tok, eval_text, baseline=base, max_tokens=max_tokens, layers=result.layer_reports(), extra=extra)
            else:
                report = api.evaluate(model, tok, sampled_eval, baseline=base, max_tokens=None, window=seq_len,
                                      layers=result.layer_reports(), extra=extra,
                                      text_label=f"sampled from the base model ({sampled_eval.shape[0]} x {seq_len} tokens, seed {seed}, "
                                                 "disjoint from the calibration sequences)")
    described = method_name if method is None else method.name + (f"+{comp.describe()}" if comp else "")
    mode_desc = " ".join(f"--{k} {v}" for k, v in modes.items() if v)
    report = _with(report, model=model_src, method=described + (f" ({mode_desc})" if mode_desc else ""),
                   format=fmt_spec if fmt is None else fmt.spec(), seconds=time.perf_counter() - t_start)
    if output is not None:
        if method_name == "slicegpt":  # a smaller dense model of its own shape: save_pretrained + config entry
            from .transforms.slicegpt import save_sliced

            save_sliced(model, output, tokenizer=tok)
            console.print(f"sliced model written to {output} (tensorslim eval / load_model read it back)")
        else:
            _save(model, tok, output, model_src, report)
        progress.clear()
    console.print(render(report))
    if json_out is not None:
        report.write_json(json_out)
        console.print(f"report written to {json_out}")


# "methods" that rewrite the model or its run time instead of compressing weights one by one
_MODEL_TRANSFORMS = {"slicegpt": "slice", "wina": "act", "teal": "act"}


_TRANSFORM_OPTIONS = {"slice": {"global": ("basis", "global"), "block": ("basis", "block")},
                      "act": {"greedy": ("allocation", "greedy"), "uniform": ("allocation", "uniform"),
                              "topk": ("mode", "topk"), "threshold": ("mode", "threshold")}}


def _transform_spec(method_name: str, fmt_spec: str) -> tuple[float, dict]:
    """``slice:0.2[:global|:block]``, ``act:0.4[:uniform|:greedy][:topk|:threshold]`` -> (fraction, options)."""
    from .errors import ConfigError

    prefix = _MODEL_TRANSFORMS[method_name]
    head, _, rest = fmt_spec.partition(":")
    value, *words = rest.split(":")
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    allowed = _TRANSFORM_OPTIONS[prefix]
    bad = [w for w in words if w not in allowed]
    if head != prefix or not 0.0 <= f < 1.0 or bad:
        raise ConfigError(f"--method {method_name} takes --format {prefix}:<fraction in [0, 1)>"
                          f"[{''.join(':' + w for w in allowed)}] (options optional), e.g. {prefix}:0.2; got {fmt_spec!r}")
    return f, dict(allowed[w] for w in words)


def _apply_model_transform(model, method_name: str, fraction: float, data, batch_size: int, opts: dict):
    from .api import CompressionResult, model_size
    from .models import get_adapter

    adapter = get_adapter(model)
    t0 = time.perf_counter()
    if method_name == "slicegpt":
        from .transforms.slicegpt import apply_slicegpt

        apply_slicegpt(model, adapter, data, fraction, batch_size=batch_size, **opts)
    else:
        from .runtime.wina import apply_activation_sparsity

        apply_activation_sparsity(model, adapter, data, fraction, kind=method_name, batch_size=batch_size, **opts)
    seconds = time.perf_counter() - t0
    bpw, model_bpw = model_size(model, get_adapter(model))
    return CompressionResult(layers=(), seconds=seconds, bits_per_weight=bpw, model_bits_per_weight=model_bpw)


def _apply_runtime_modes(model, modes: dict) -> None:
    from .models import get_adapter

    if modes["kv"]:
        from .runtime.kvcache import apply_kv_quant

        apply_kv_quant(model, get_adapter(model), modes["kv"])
    if modes["act"]:
        from .runtime.actquant import apply_activation_quant

        apply_activation_quant(model, get_adapter(model), modes["act"])
    if modes["numerics"]:
        from .runtime.numerics import apply_numerics

        apply_numerics(model, modes["numerics"], adapter=get_adapter(model))


def _with(report, **changes):
    import dataclasses

    return dataclasses.replace(report, **changes)


def _parse_compensate(spec: str):
    try:
        from .methods.eora import parse_compensate
    except ImportError as e:
        from .errors import ConfigError

        raise ConfigError(f"--compensate {spec!r}: compensation stages are not available in this build") from e
    return parse_compensate(spec)


def _sha256(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _progress(model, output: Path, fingerprint: dict, resume: bool):
    """Per-block progress beside OUT; a fresh run (no --resume) starts over."""
    from .io.resume import BlockProgress, progress_dir_for
    from .models import get_adapter

    folder = progress_dir_for(output)
    if not resume:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return BlockProgress(folder, fingerprint=fingerprint, blocks=get_adapter(model).blocks)


def _save(model, tokenizer, output: Path, source: str, report) -> None:
    from .io.checkpoint import save

    save(model, output, tokenizer=tokenizer, source=source, report=report.to_dict())
    console.print(f"checkpoint written to {output}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    text: Annotated[Path, typer.Option(help="evaluation text file")],
    baseline: Annotated[Optional[str], typer.Option(help="base model for KL divergence and top-1 agreement")] = None,
    max_tokens: Annotated[int, typer.Option(help="evaluation tokens (first N of the tokenized text)")] = 32768,
    window: Annotated[int, typer.Option(help="window length (non-overlapping)")] = 2048,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the report as JSON")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    baseline_cache: Annotated[Optional[Path], typer.Option(help=_CACHE_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Perplexity of MODEL on TEXT (standard protocol), and KL / top-1 agreement against --baseline."""
    _setup_logging(verbose)
    try:
        from . import api
        from .eval.report import render

        with console.status(f"loading {model}"):
            m, tok = api.load_model(model, device=device)
            base = _cached(api.load_model(baseline, device=device)[0] if baseline else None, baseline_cache)
        with console.status("evaluating"):
            report = api.evaluate(m, tok, text, baseline=base, max_tokens=max_tokens, window=window)
        report = _with(report, model=model)
        console.print(render(report))
        if json_out is not None:
            report.write_json(json_out)
            console.print(f"report written to {json_out}")
    except TensorslimError as e:
        _fail(e)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[str, typer.Argument(help="tensorslim checkpoint folder")],
    to: Annotated[str, typer.Option("--to", help="gguf, compressed-tensors or hf")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output file (gguf) or folder")],
    dequantize: Annotated[bool, typer.Option("--dequantize", help="write layers the target cannot represent as dense")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export a checkpoint for llama.cpp (gguf), vLLM (compressed-tensors) or any tool (hf, dense)."""
    _setup_logging(verbose)
    try:
        from .io import export

        with console.status(f"exporting {checkpoint} to {to}"):
            path = export(checkpoint, to, output, dequantize_unsupported=dequantize)
        console.print(f"written {path}")
    except TensorslimError as e:
        _fail(e)


@app.command("inspect")
def inspect_cmd(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    spectra: Annotated[bool, typer.Option("--spectra", help="singular-value spectra of every block linear")] = False,
    png: Annotated[Optional[Path], typer.Option(help="with --spectra: write a plot of the spectra")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the table as JSON")] = None,
) -> None:
    """Per layer: format, bits per weight (and with --spectra: energy ranks and WeLore's class)."""
    try:
        from rich.table import Table

        from . import api
        from .formats import CompressedLinear
        from .models import get_adapter

        with console.status(f"loading {model}"):
            m, _ = api.load_model(model)
        adapter = get_adapter(m)
        if spectra:
            from .inspect_spectra import inspect_spectra

            rows = inspect_spectra(m, adapter, png)
        else:
            rows = []
            for name in adapter.linear_names(m):
                mod = m.get_submodule(name)
                if isinstance(mod, CompressedLinear):
                    cw = mod.compressed
                    rows.append({"name": name, "format": cw.format.spec(), "method": mod.method,
                                 "bits_per_weight": round(cw.bits_per_weight, 4), "nbytes": cw.nbytes})
                else:
                    rows.append({"name": name, "format": f"dense {str(mod.weight.dtype).removeprefix('torch.')}",
                                 "method": None, "bits_per_weight": 8 * mod.weight.element_size(),
                                 "nbytes": mod.weight.numel() * mod.weight.element_size()})
        table = Table(*rows[0].keys()) if rows else Table("name")
        for r in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
        console.print(table)
        bpw, model_bpw = api.model_size(m, adapter)
        console.print(f"block linears: {bpw:.4f} bits per weight; whole model: {model_bpw:.4f}")
        if json_out is not None:
            json_out.write_text(json.dumps(rows, indent=1, default=str))
        if png is not None and spectra:
            console.print(f"plot written to {png}")
    except TensorslimError as e:
        _fail(e)


@app.command("methods")
def methods_cmd() -> None:
    """List the registered methods and format families."""
    from .formats import known_formats
    from .methods import known_methods

    console.print("methods: " + ", ".join(known_methods()))
    console.print("format families: " + ", ".join(known_formats()))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
