"""Tests of the JSON report interface (schema tensorslim.report/1) and its rich rendering."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from tensorslim.errors import ConfigError
from tensorslim.eval import SCHEMA, LayerReport, Report, mean_bits_per_weight, render

TOP_KEYS = {
    "schema",
    "perplexity",
    "kl_mean",
    "kl_p99",
    "top1_agreement",
    "bits_per_weight",
    "tokens_evaluated",
    "seconds",
    "text",
    "model",
    "method",
    "format",
    "layers",
    "extra",
}
LAYER_KEYS = {"name", "format", "numel", "bits_per_weight", "relative_error", "method", "seconds"}


def _report(**over) -> Report:
    layers = (
        LayerReport(name="model.layers.0.self_attn.q_proj", format="int4:g64", numel=576 * 576,
                    bits_per_weight=4.25, relative_error=0.031, method="gptq", seconds=0.4),
        LayerReport(name="model.layers.0.mlp.down_proj", format="int4:g64", numel=576 * 1536,
                    bits_per_weight=4.25, relative_error=0.057, method="gptq", seconds=1.1),
        LayerReport(name="lm_head", format="dense", numel=576 * 49152, bits_per_weight=32.0, relative_error=None),
    )
    kw = dict(
        perplexity=21.4,
        kl_mean=0.021,
        kl_p99=0.19,
        top1_agreement=0.93,
        bits_per_weight=4.25,
        tokens_evaluated=32752,
        seconds=93.5,
        layers=layers,
        text="file:/data/wiki.test.raw (first 32768 tokens)",
        model="smollm2-135m",
        method="gptq",
        format="int4:g64",
        extra={"baseline_perplexity": 20.82, "compress_seconds": 41.0, "skipped": ["lm_head"]},
    )
    kw.update(over)
    return Report(**kw)


def test_to_dict_keys_and_values():
    d = _report().to_dict()
    assert set(d) == TOP_KEYS
    assert d["schema"] == SCHEMA == "tensorslim.report/1"
    assert all(set(layer) == LAYER_KEYS for layer in d["layers"])
    assert d["layers"][2]["relative_error"] is None
    assert d["extra"]["skipped"] == ["lm_head"]
    json.dumps(d, allow_nan=False)  # strict JSON


def test_no_baseline_gives_nulls():
    d = _report(kl_mean=None, kl_p99=None, top1_agreement=None, layers=(), extra={}).to_dict()
    assert d["kl_mean"] is None and d["kl_p99"] is None and d["top1_agreement"] is None
    assert d["layers"] == [] and d["extra"] == {}


def test_round_trip_dict_and_json(tmp_path):
    r = _report()
    assert Report.from_dict(r.to_dict()) == r
    path = r.write_json(tmp_path / "sub" / "report.json")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left behind
    on_disk = json.loads(path.read_text())
    assert on_disk == r.to_dict()
    assert Report.read_json(path) == r
    # overwrite atomically
    r2 = _report(perplexity=30.0)
    r2.write_json(path)
    assert Report.read_json(path).perplexity == 30.0


def test_non_finite_numbers_are_strict_json(tmp_path):
    r = _report(perplexity=math.inf, layers=(LayerReport(name="a", format="x", numel=1, bits_per_weight=1.0,
                                                         relative_error=math.inf),))
    d = r.to_dict()
    assert d["perplexity"] == "inf" and d["layers"][0]["relative_error"] == "inf"
    back = Report.read_json(r.write_json(tmp_path / "r.json"))
    assert back.perplexity == math.inf and back.layers[0].relative_error == math.inf


def test_from_dict_checks_schema_and_ignores_unknown_keys():
    d = _report().to_dict()
    d["future_key"] = 1
    assert Report.from_dict(d) == _report()
    with pytest.raises(ConfigError, match="schema"):
        Report.from_dict({**d, "schema": "tensorslim.report/2"})
    with pytest.raises(ConfigError, match="seconds"):
        Report.from_dict({k: v for k, v in d.items() if k != "seconds"})


def test_validation_and_immutability():
    with pytest.raises(ConfigError, match="top1_agreement"):
        _report(top1_agreement=1.5)
    with pytest.raises(ConfigError, match="extra"):
        _report(extra={"obj": object()})
    with pytest.raises(ConfigError, match="numel"):
        LayerReport(name="a", format="x", numel=-1, bits_per_weight=4.0, relative_error=None)
    with pytest.raises(ConfigError, match="name"):
        LayerReport(name="", format="x", numel=1, bits_per_weight=4.0, relative_error=None)
    src = {"a": 1}
    r = _report(extra=src)
    src["a"] = 2
    assert r.extra["a"] == 1
    with pytest.raises(TypeError):
        r.extra["b"] = 3  # type: ignore[index]


def test_mean_bits_per_weight():
    layers = _report().layers
    expected = (4.25 * (576 * 576 + 576 * 1536) + 32.0 * 576 * 49152) / (576 * 576 + 576 * 1536 + 576 * 49152)
    assert mean_bits_per_weight(layers) == pytest.approx(expected)
    assert mean_bits_per_weight(()) is None


def test_render_shows_worst_layers_first():
    console = Console(width=160, record=True)
    console.print(render(_report(), max_layers=2))
    out = console.export_text()
    assert "21.4000" in out and "93.00 %" in out and "baseline_perplexity" in out
    assert "2 worst of 3 layers" in out
    assert out.index("down_proj") < out.index("q_proj")
    assert "lm_head" not in out.split("worst")[1]
