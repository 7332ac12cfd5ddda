"""`--rotate flatquant` on the command line (tiny Llama folder, text sampled from the model)."""

import json

from typer.testing import CliRunner

from tensorslim.cli import app

runner = CliRunner()


def test_flatquant_w4a4_runs_and_reports(tiny_llm_dir, tmp_path):
    rep = tmp_path / "r.json"
    r = runner.invoke(app, ["compress", str(tiny_llm_dir), "--format", "int4:g32", "--rotate", "flatquant", "--act", "int4",
                            "--samples", "2", "--seq-len", "16", "--json", str(rep)])
    assert r.exit_code == 0, r.output
    assert "FlatQuant transforms fitted" in r.output
    report = json.loads(rep.read_text())
    assert "--rotate flatquant" in report["method"] and "--act int4" in report["method"]
    assert report["kl_mean"] > 0 and len(report["layers"]) == 14


def test_flatquant_needs_an_activation_width(tiny_llm_dir):
    r = runner.invoke(app, ["compress", str(tiny_llm_dir), "--rotate", "flatquant", "--samples", "2", "--seq-len", "16",
                            "--no-eval"])
    assert r.exit_code == 2 and "--act int4" in r.output
