"""The CLI end to end on a tiny Llama folder: compress -> checkpoint -> eval -> export, resume, errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tensorslim.cli import app

runner = CliRunner()
CALIB = "../shared/data/wikitext-2/valid.txt"
TEST = "../shared/data/wikitext-2-raw/wiki.test.raw"


def _calib_path(request):
    from pathlib import Path

    root = Path(request.config.rootpath)
    p = (root / CALIB).resolve(), (root / TEST).resolve()
    if not p[0].exists() or not p[1].exists():
        pytest.skip("shared WikiText-2 data not found beside the checkout")
    return p


def test_compress_save_eval_export(tiny_llm_dir, tmp_path, request):
    calib, test = _calib_path(request)
    out = tmp_path / "ckpt"
    rep = tmp_path / "r.json"
    r = runner.invoke(app, ["compress", str(tiny_llm_dir), "--method", "rtn", "--format", "int4:g32", "--calib", str(calib),
                            "--samples", "4", "--seq-len", "64", "--eval-text", str(test), "--max-tokens", "300",
                            "--json", str(rep), "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["tokens_evaluated"] == 299 and report["kl_mean"] >= 0 and len(report["layers"]) == 14
    assert report["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32)
    assert (out / "tensorslim.json").exists()
    # the checkpoint evaluates to the same perplexity as the in-memory model did
    rep2 = tmp_path / "r2.json"
    cache = tmp_path / "base-logits"
    for _ in range(2):  # the second run reads the base model's logits from the cache folder: same numbers
        r = runner.invoke(app, ["eval", str(out), "--text", str(test), "--max-tokens", "300", "--baseline",
                                str(tiny_llm_dir), "--json", str(rep2), "--baseline-cache", str(cache)])
        assert r.exit_code == 0, r.output
        report2 = json.loads(rep2.read_text())
        assert report2["perplexity"] == pytest.approx(report["perplexity"], rel=1e-6)
        assert report2["kl_mean"] == pytest.approx(report["kl_mean"], rel=1e-5, abs=1e-9)
    assert len(list(cache.glob("logits-*.safetensors"))) == 1
    r = runner.invoke(app, ["export", str(out), "--to", "hf", "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "config.json").exists()


def test_resume_matches_uninterrupted(tiny_llm_dir, tmp_path, request, monkeypatch):
    """Interrupt after block 0 (an exception from the progress hook), resume: same tensors as a clean run."""
    from safetensors.torch import load_file

    from tensorslim.io import resume as resume_mod

    calib, _ = _calib_path(request)
    args = ["compress", str(tiny_llm_dir), "--method", "rtn", "--format", "int3:g32", "--calib", str(calib),
            "--samples", "4", "--seq-len", "32", "--no-eval"]
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert runner.invoke(app, args + ["-o", str(clean)]).exit_code == 0
    original = resume_mod.BlockProgress.on_block_done

    def crash_after_first(self, index, model, cache=None):
        original(self, index, model, cache)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume_mod.BlockProgress, "on_block_done", crash_after_first)
    r = runner.invoke(app, args + ["-o", str(resumed)])
    assert r.exit_code != 0 and not resumed.exists()
    monkeypatch.setattr(resume_mod.BlockProgress, "on_block_done", original)
    r = runner.invoke(app, args + ["-o", str(resumed), "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming at block 1" in r.output
    shards = sorted(p.name for p in clean.glob("*.safetensors"))
    assert shards == sorted(p.name for p in resumed.glob("*.safetensors"))
    for name in shards:
        a, b = load_file(clean / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_output_is_an_error(tiny_llm_dir):
    r = runner.invoke(app, ["compress", str(tiny_llm_dir), "--resume", "--no-eval"])
    assert r.exit_code == 2 and "-o" in r.output


def test_inspect_checkpoint_and_spectra(tiny_llm_dir, tmp_path):
    out = tmp_path / "ckpt"
    r = runner.invoke(app, ["compress", str(tiny_llm_dir), "--format", "int4:g32", "--samples", "2", "--seq-len", "16",
                            "--no-eval", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = tmp_path / "rows.json"
    r = runner.invoke(app, ["inspect", str(out), "--json", str(rows)])
    assert r.exit_code == 0, r.output
    data = json.loads(rows.read_text())
    assert len(data) == 14 and all(d["format"] == "int4:g32" for d in data)
    r = runner.invoke(app, ["inspect", str(tiny_llm_dir), "--spectra", "--png", str(tmp_path / "s.png"),
                            "--json", str(rows)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").stat().st_size > 1000 and len(json.loads(rows.read_text())) == 14
