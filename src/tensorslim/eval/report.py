"""The evaluation report: a stable JSON interface (schema ``tensorslim.report/1``) and a readable rich summary.

Other tools read the JSON, so its keys are documented in docs/evaluation.md and only grow: a new optional key does
not change the schema string; renaming or removing one does. Readers ignore keys they do not know. JSON is strict
(no NaN/Infinity literals): a non-finite number is written as the string "inf", "-inf" or "nan" and read back as a
float.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["SCHEMA", "LayerReport", "Report", "mean_bits_per_weight", "render"]

logger = logging.getLogger(__name__)

SCHEMA = "tensorslim.report/1"

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _num_out(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _num_in(name: str, x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, str) and x in _NONFINITE:
        return _NONFINITE[x]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"report field {name!r} must be a number or null, got {x!r}")
    return float(x)


def _check_opt_float(owner: str, name: str, x: Any, *, nonneg: bool = False) -> None:
    if x is None:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"{owner}.{name} must be a float or None, got {x!r}")
    if nonneg and x < 0:
        raise ConfigError(f"{owner}.{name}={x!r} is invalid; it must be >= 0")


def _check_opt_str(owner: str, name: str, x: Any) -> None:
    if x is not None and not isinstance(x, str):
        raise ConfigError(f"{owner}.{name} must be a str or None, got {x!r}")


def _check_json_value(path: str, x: Any) -> None:
    if x is None or isinstance(x, (str, bool, int, float)):
        return
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _check_json_value(f"{path}[{i}]", v)
        return
    if isinstance(x, Mapping):
        for k, v in x.items():
            if not isinstance(k, str):
                raise ConfigError(f"Report.{path} has a non-string key {k!r}; JSON objects need string keys")
            _check_json_value(f"{path}.{k}", v)
        return
    raise ConfigError(f"Report.{path}={x!r} is not JSON-serializable; use str, int, float, bool, None, list or dict")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return _num_out(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Mapping):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


@dataclass(frozen=True, kw_only=True)
class LayerReport:
    """One compressed (or skipped) layer: its format, size, bits per weight and error on calibration inputs."""

    name: str
    format: str
    numel: int
    bits_per_weight: float
    relative_error: float | None
    method: str | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"LayerReport.name={self.name!r} is invalid; use the module's dotted name")
        if not isinstance(self.format, str):
            raise ConfigError(f"LayerReport.format={self.format!r} is invalid; use the format's spec string")
        if isinstance(self.numel, bool) or not isinstance(self.numel, int) or self.numel < 0:
            raise ConfigError(f"LayerReport.numel={self.numel!r} is invalid; use an integer >= 0")
        if self.bits_per_weight is None:
            raise ConfigError("LayerReport.bits_per_weight is required (a float >= 0)")
        _check_opt_float("LayerReport", "bits_per_weight", self.bits_per_weight, nonneg=True)
        _check_opt_float("LayerReport", "relative_error", self.relative_error, nonneg=True)
        _check_opt_str("LayerReport", "method", self.method)
        _check_opt_float("LayerReport", "seconds", self.seconds, nonneg=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "numel": self.numel,
            "bits_per_weight": _num_out(self.bits_per_weight),
            "relative_error": _num_out(self.relative_error),
            "method": self.method,
            "seconds": _num_out(self.seconds),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerReport:
        if not isinstance(d, Mapping):
            raise ConfigError(f"a layer entry must be a JSON object, got {d!r}")
        for key in ("name", "format", "numel", "bits_per_weight"):
            if key not in d:
                raise ConfigError(f"layer entry {d.get('name', '?')!r} lacks the required key {key!r}")
        return cls(
            name=d["name"],
            format=d["format"],
            numel=d["numel"],
            bits_per_weight=_num_in("bits_per_weight", d["bits_per_weight"]),  # type: ignore[arg-type]
            relative_error=_num_in("relative_error", d.get("relative_error")),
            method=d.get("method"),
            seconds=_num_in("seconds", d.get("seconds")),
        )


def mean_bits_per_weight(layers: tuple[LayerReport, ...] | list[LayerReport]) -> float | None:
    """Weight-count-weighted mean bits per weight over ``layers``; None when there are no weights."""
    total = sum(layer.numel for layer in layers)
    if total == 0:
        return None
    return sum(layer.bits_per_weight * layer.numel for layer in layers) / total


@dataclass(frozen=True, kw_only=True)
class Report:
    """Quality, size and provenance of one evaluated model. ``to_dict`` is the documented JSON schema."""

    perplexity: float | None
    kl_mean: float | None
    kl_p99: float | None
    top1_agreement: float | None
    bits_per_weight: float | None
    tokens_evaluated: int | None
    seconds: float
    layers: tuple[LayerReport, ...] = ()
    text: str | None = None
    model: str | None = None
    method: str | None = None
    format: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("perplexity", "kl_mean", "kl_p99", "top1_agreement", "bits_per_weight"):
            _check_opt_float("Report", name, getattr(self, name))
        if self.top1_agreement is not None and not 0.0 <= self.top1_agreement <= 1.0:
            raise ConfigError(f"Report.top1_agreement={self.top1_agreement!r} is invalid; it is a fraction in [0, 1]")
        tok = self.tokens_evaluated
        if tok is not None and (isinstance(tok, bool) or not isinstance(tok, int) or tok < 0):
            raise ConfigError(f"Report.tokens_evaluated={tok!r} is invalid; use an integer >= 0 or None")
        if self.seconds is None:
            raise ConfigError("Report.seconds is required (wall-clock seconds, a float >= 0)")
        _check_opt_float("Report", "seconds", self.seconds, nonneg=True)
        layers = tuple(self.layers)
        for layer in layers:
            if not isinstance(layer, LayerReport):
                raise ConfigError(f"Report.layers must hold LayerReport objects, got {layer!r}")
        object.__setattr__(self, "layers", layers)
        for name in ("text", "model", "method", "format"):
            _check_opt_str("Report", name, getattr(self, name))
        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"Report.extra must be a mapping of str to JSON values, got {self.extra!r}")
        _check_json_value("extra", self.extra)
        object.__setattr__(self, "extra", types.MappingProxyType(dict(self.extra)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of schema ``tensorslim.report/1`` (key order as documented)."""
        return {
            "schema": SCHEMA,
            "perplexity": _num_out(self.perplexity),
            "kl_mean": _num_out(self.kl_mean),
            "kl_p99": _num_out(self.kl_p99),
            "top1_agreement": _num_out(self.top1_agreement),
            "bits_per_weight": _num_out(self.bits_per_weight),
            "tokens_evaluated": self.tokens_evaluated,
            "seconds": _num_out(self.seconds),
            "text": self.text,
            "model": self.model,
            "method": self.method,
            "format": self.format,
            "layers": [layer.to_dict() for layer in self.layers],
            "extra": _jsonable(dict(self.extra)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`. Checks the schema string; ignores keys it does not know."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a report must be a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise ConfigError(f"report schema is {d.get('schema')!r}; this version reads {SCHEMA!r}")
        known = {f.name for f in fields(cls)} | {"schema"}
        unknown = sorted(set(d) - known)
        if unknown:
            logger.debug("ignoring unknown report keys %s", unknown)
        if "seconds" not in d:
            raise ConfigError("report lacks the required key 'seconds'")
        layers = d.get("layers") or []
        if not isinstance(layers, list):
            raise ConfigError(f"report 'layers' must be a list, got {type(layers).__name__}")
        extra = d.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"report 'extra' must be an object, got {type(extra).__name__}")
        return cls(
            perplexity=_num_in("perplexity", d.get("perplexity")),
            kl_mean=_num_in("kl_mean", d.get("kl_mean")),
            kl_p99=_num_in("kl_p99", d.get("kl_p99")),
            top1_agreement=_num_in("top1_agreement", d.get("top1_agreement")),
            bits_per_weight=_num_in("bits_per_weight", d.get("bits_per_weight")),
            tokens_evaluated=d.get("tokens_evaluated"),
            seconds=_num_in("seconds", d["seconds"]),  # type: ignore[arg-type]
            layers=tuple(LayerReport.from_dict(x) for x in layers),
            text=d.get("text"),
            model=d.get("model"),
            method=d.get("method"),
            format=d.get("format"),
            extra=dict(extra),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON atomically: a temporary file in the same folder, fsync, then ``os.replace``."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = self.to_json()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        logger.info("wrote report to %s", target)
        return target

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> Report:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"report file {str(p)!r} does not exist") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"report file {str(p)!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: Report, *, max_layers: int = 12) -> Any:
    """A rich renderable: a summary table, then the ``max_layers`` worst layers by relative error."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title="tensorslim report", show_header=False, title_justify="left")
    summary.add_column("key", style="bold")
    summary.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("model", report.model or "-"),
        ("method", report.method or "-"),
        ("format", report.format or "-"),
        ("text", report.text or "-"),
        ("perplexity", _fmt(report.perplexity, ".4f")),
        ("KL mean", _fmt(report.kl_mean, ".5f")),
        ("KL p99", _fmt(report.kl_p99, ".5f")),
        ("top-1 agreement", "-" if report.top1_agreement is None else f"{100 * report.top1_agreement:.2f} %"),
        ("bits per weight", _fmt(report.bits_per_weight, ".3f")),
        ("tokens evaluated", "-" if report.tokens_evaluated is None else f"{report.tokens_evaluated:,}"),
        ("seconds", f"{report.seconds:.1f}"),
    ]
    for key, value in report.extra.items():
        if value is None or isinstance(value, (str, int, float)):
            rows.append((key, format(value, ".4g") if isinstance(value, float) else str(value)))
    for key, value in rows:
        summary.add_row(key, value)
    if not report.layers:
        return Group(summary)
    worst = sorted(
        report.layers,
        key=lambda r: (r.relative_error is None, -(r.relative_error or 0.0)),
    )[: max(max_layers, 0)]
    layers = Table(
        title=f"{len(worst)} worst of {len(report.layers)} layers by relative error", title_justify="left"
    )
    for name, justify in (("layer", "left"), ("format", "left"), ("method", "left"), ("bits/w", "right"),
                          ("weights", "right"), ("rel. error", "right"), ("seconds", "right")):
        # the layer name is what the reader needs: it never truncates, it folds
        layers.add_column(name, justify=justify, overflow="fold",
                          min_width=24 if name == "layer" else None)  # type: ignore[arg-type]
    for r in worst:
        layers.add_row(
            r.name,
            r.format,
            r.method or "-",
            f"{r.bits_per_weight:.3f}",
            f"{r.numel:,}",
            _fmt(r.relative_error, ".4g"),
            _fmt(r.seconds, ".2f"),
        )
    return Group(summary, layers)
