"""Native checkpoint: save -> load gives bit-identical logits for every registered format and tiny architecture."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tensorslim.errors import CheckpointError
from tensorslim.formats import CompressedLinear, parse_format, registry
from tensorslim.io import load, read_manifest, save
from tensorslim.io.atomic import atomic_folder
from tensorslim.models.tiny import TINY_ARCHS, tiny_model

from .helpers import EXAMPLES, compress_linears, logits, wide_llama

ALL_SPECS = [s for specs in EXAMPLES.values() for s in specs]


def test_every_registered_family_has_an_example():
    missing = sorted(set(registry._CLASSES) - set(EXAMPLES))
    assert not missing, f"add example specs for format families {missing} to tests/io/helpers.py EXAMPLES"


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (2, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_round_trip_every_format(tmp_path: Path, spec: str):
    model = wide_llama(1) if spec in EXAMPLES["kquant"] else tiny_model("llama", seed=1)
    n = compress_linears(model, spec, under="model.layers.1")
    assert n > 0, f"{spec}: no layer could take the format"
    x = _tokens()
    ref = logits(model, x)
    save(model, tmp_path / "ck")
    back, tok = load(tmp_path / "ck")
    assert tok is None
    assert torch.equal(logits(back, x), ref)
    got = {k: m.compressed for k, m in back.named_modules() if isinstance(m, CompressedLinear)}
    want = {k: m.compressed for k, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(got) == set(want)
    for k, cw in want.items():
        assert got[k].format == cw.format and got[k].shape == cw.shape
        a, b = cw.tensors(), got[k].tensors()
        assert set(a) == set(b)
        for t in a:
            assert a[t].dtype == b[t].dtype and torch.equal(a[t], b[t]), (k, t)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_round_trip_every_architecture(tmp_path: Path, arch: str):
    model = tiny_model(arch, seed=2)
    compress_linears(model, "int4:g32")
    x = _tokens(1)
    ref = logits(model, x)
    save(model, tmp_path / "ck", max_shard_bytes=20_000)  # forces several shards
    assert len(read_manifest(tmp_path / "ck")["shards"]) > 1
    back, _ = load(tmp_path / "ck")
    assert type(back) is type(model)
    assert torch.equal(logits(back, x), ref)


def test_dense_model_and_tied_embeddings(tmp_path: Path):
    import transformers as hf

    torch.manual_seed(0)
    cfg = hf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = hf.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save(model, tmp_path / "ck")
    m = read_manifest(tmp_path / "ck")
    assert m["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    back, _ = load(tmp_path / "ck")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    x = torch.randint(0, 64, (1, 9))
    assert torch.equal(logits(back, x), logits(model, x))


def test_manifest_records_layers_and_metadata(tmp_path: Path):
    model = tiny_model("llama")
    compress_linears(model, "int4:g32:sym")
    save(model, tmp_path / "ck", source="tiny", plan={"*": "rtn int4:g32:sym"}, report={"ppl": 1.5},
         manifest_extra={"seed": 0})
    m = read_manifest(tmp_path / "ck")
    entry = m["layers"]["model.layers.0.self_attn.q_proj"]
    assert parse_format("int4:g32:sym").to_dict() == entry["format"]
    assert entry["shape"] == [64, 64] and entry["method"] == "test" and entry["tensors"] == ["codes", "scales"]
    assert m["model"]["source"] == "tiny" and m["plan"] == {"*": "rtn int4:g32:sym"} and m["report"] == {"ppl": 1.5}
    assert m["extra"] == {"seed": 0}


def test_save_is_deterministic(tmp_path: Path):
    for name in ("a", "b"):
        model = tiny_model("qwen3", seed=3)
        compress_linears(model, "int3:g32")
        save(model, tmp_path / name, max_shard_bytes=30_000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_overwrite_replaces_and_failed_write_keeps_old(tmp_path: Path):
    model = tiny_model("llama")
    save(model, tmp_path / "ck")
    before = (tmp_path / "ck" / "tensorslim.json").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "ck") as tmp:
            (tmp / "junk").write_text("x")
            raise RuntimeError("killed")
    assert (tmp_path / "ck" / "tensorslim.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folder left
    compress_linears(model, "int8:pc")
    save(model, tmp_path / "ck")
    assert read_manifest(tmp_path / "ck")["layers"]
    with pytest.raises(CheckpointError):
        save(model, tmp_path / "ck", overwrite=False)


def test_interrupted_swap_is_recovered(tmp_path: Path):
    """A writer killed between 'old aside' and 'new in place' leaves .ck.old-<dead pid>-x: load restores it."""
    model = tiny_model("llama")
    save(model, tmp_path / "ck")
    os.replace(tmp_path / "ck", tmp_path / ".ck.old-999999999-abcd")
    (tmp_path / ".ck.tmp-999999999-abcd").mkdir()  # the dead writer's half-written new folder
    back, _ = load(tmp_path / "ck")
    x = _tokens()
    assert torch.equal(logits(back, x), logits(model, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the dead writer's temp folder is gone too


def test_tokenizer_round_trip(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(100)} | {"<unk>": 100}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    model = tiny_model("llama")
    save(model, tmp_path / "ck", tokenizer=tok)
    _, back = load(tmp_path / "ck")
    assert back("t1 t5 t99")["input_ids"] == tok("t1 t5 t99")["input_ids"]
    m = read_manifest(tmp_path / "ck")
    name = sorted(m["tokenizer"]["files"])[0]
    (tmp_path / "ck" / "tokenizer" / name).write_text("{}")
    with pytest.raises(CheckpointError, match="sha256"):
        load(tmp_path / "ck")


def test_refuses_unknown_format_family(tmp_path: Path):
    from tensorslim.io import manifest as mf

    model = tiny_model("llama")
    compress_linears(model, "int4:g32")
    save(model, tmp_path / "ck")
    path = tmp_path / "ck" / "tensorslim.json"
    m = json.loads(path.read_text())
    first = next(iter(m["layers"]))
    m["layers"][first]["format"]["family"] = "os.system"
    path.write_text(mf.finalize(m))
    with pytest.raises(CheckpointError, match="not an allowed format"):
        load(tmp_path / "ck")


def test_refuses_non_transformers_class(tmp_path: Path):
    from tensorslim.io import manifest as mf

    save(tiny_model("llama"), tmp_path / "ck")
    path = tmp_path / "ck" / "tensorslim.json"
    m = json.loads(path.read_text())
    for bad in ("pipeline", "AutoModel", "BertModel", "__import__"):
        m["model"]["class"] = bad
        path.write_text(mf.finalize(m))
        with pytest.raises(CheckpointError):
            load(tmp_path / "ck")


def test_missing_folder_and_models_dispatch(tmp_path: Path):
    with pytest.raises(CheckpointError):
        load(tmp_path / "nope")
    from tensorslim.models import load_model

    model = tiny_model("mistral")
    compress_linears(model, "int4:g32")
    save(model, tmp_path / "ck")
    back, _ = load_model(tmp_path / "ck")
    x = _tokens()
    assert torch.equal(logits(back, x), logits(model, x))


@pytest.mark.parametrize("bad", [{"": None, 0: None}, {"x": float("nan")}, {"x": object()}])
def test_finalize_refuses_values_that_are_not_plain_json(bad: dict):
    # keys of mixed types fail in the digest's sorted serialization; that too is a CheckpointError (found by fuzzing)
    from tensorslim.io import manifest as mf

    with pytest.raises(CheckpointError, match="not plain JSON"):
        mf.finalize({"schema": "tensorslim", "extra": bad})
