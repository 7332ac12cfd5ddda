import json

import pytest
from typer.testing import CliRunner

from tensorslim.cli import app

runner = CliRunner()


def test_bad_format_is_a_clear_error_without_loading_anything():
    r = runner.invoke(app, ["compress", "smollm2-135m", "--format", "int9:g64"])
    assert r.exit_code == 2
    assert "int9:g64" in r.output


def test_unknown_method_lists_known_ones():
    r = runner.invoke(app, ["compress", "smollm2-135m", "--method", "nope"])
    assert r.exit_code == 2
    assert "known methods" in r.output and "rtn" in r.output


def test_unknown_model_alias_is_a_clear_error():
    r = runner.invoke(app, ["compress", "no-such-model-alias", "--no-eval"])
    assert r.exit_code == 2
    assert "smollm2-135m" in r.output  # the message lists the aliases


def test_methods_lists_registries():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "rtn" in r.output and "int" in r.output


@pytest.mark.slow
def test_default_main_job_on_real_model_small_slice(tmp_path):
    """The README's main job on a small slice: sampled text, RTN int4 g64, report with every documented key."""
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["compress", "smollm2-135m", "--samples", "2", "--seq-len", "64", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    for key in ("perplexity", "kl_mean", "kl_p99", "top1_agreement", "bits_per_weight", "tokens_evaluated", "seconds", "layers"):
        assert key in rep
    assert len(rep["layers"]) == 210
    assert rep["bits_per_weight"] == pytest.approx(4.3177, abs=1e-4)  # zero points of 9 groups pad to 5 bytes a row
    assert 0 < rep["kl_mean"] < 1 and 0.5 < rep["top1_agreement"] <= 1
    assert "sampled" in rep["text"]
    assert {"name", "format", "numel", "bits_per_weight", "relative_error"} <= set(rep["layers"][0])
