"""Resumable compression: an interrupted run, resumed from its progress folder, gives a bit-identical checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensorslim.errors import CheckpointError
from tensorslim.io import save
from tensorslim.io.resume import BlockProgress
from tensorslim.models import get_adapter, tiny_model

runner = pytest.importorskip("tensorslim.calib.runner")


class Killed(Exception):
    pass


def _method():
    from tensorslim.formats import parse_format
    from tensorslim.methods.registry import build_method, known_methods

    name = "gptq" if "gptq" in known_methods() else "rtn"  # a method that uses the activations, when it exists
    return build_method(name, parse_format("int4:g32"))


def _run(model, batches, **kw):
    adapter = get_adapter(model)
    assign = {n: _method() for n in adapter.linear_names(model)}
    return runner.run_compression(model, adapter, assign, batches, progress=False, batch_size=2, **kw)


def test_resumed_run_is_bit_identical(tmp_path: Path):
    batches = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    fp = {"model": "tiny-llama", "method": "int4:g32", "seed": 0}
    full = tiny_model("llama", seed=11)
    _run(full, batches)
    save(full, tmp_path / "full")

    model = tiny_model("llama", seed=11)
    adapter = get_adapter(model)
    prog = BlockProgress(tmp_path / "prog", fingerprint=fp, blocks=adapter.blocks)

    def kill_after_first(i, m, cache):
        prog.on_block_done(i, m, cache)
        if i == 0:
            raise Killed

    with pytest.raises(Killed):
        _run(model, batches, on_block_done=kill_after_first)

    fresh = tiny_model("llama", seed=11)  # a new process: base model again
    prog2 = BlockProgress(tmp_path / "prog", fingerprint=fp, blocks=adapter.blocks)
    start = prog2.restore(fresh)
    assert start == 1
    cache = runner.capture_block_inputs(fresh, adapter, batches, batch_size=2, device="cpu")
    inputs = prog2.initial_inputs(cache)
    assert inputs is not None and not torch.equal(inputs[0].hidden, cache[0].hidden)
    _run(fresh, batches, start_block=start, initial_inputs=inputs, on_block_done=prog2.on_block_done)
    save(fresh, tmp_path / "resumed")
    for f in sorted(p.name for p in (tmp_path / "full").iterdir()):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "resumed" / f).read_bytes(), f
    prog2.clear()
    assert not (tmp_path / "prog").exists()


def test_other_command_and_corruption_are_refused(tmp_path: Path):
    model = tiny_model("llama")
    prog = BlockProgress(tmp_path / "p", fingerprint={"a": 1}, blocks="model.layers")
    prog.on_block_done(0, model, None)
    with pytest.raises(CheckpointError, match="different command"):
        BlockProgress(tmp_path / "p", fingerprint={"a": 2}, blocks="model.layers")
    blob = bytearray((tmp_path / "p" / "block-00000.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "p" / "block-00000.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        BlockProgress(tmp_path / "p", fingerprint={"a": 1}, blocks="model.layers").restore(tiny_model("llama"))
