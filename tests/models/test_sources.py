"""load_model: every source kind, and one typed error per kind of bad input."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorslim.errors import ConfigError, ModelSourceError, UnsupportedModelError
from tensorslim.models import ALIASES, TINY_ARCHS, get_adapter, load_model, resolve_alias, tiny_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", seed=1).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    path = resolve_alias("smollm2-135m")
    assert path is not None and path.suffix == ".gguf"
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ good sources


def test_local_folder_round_trip_gives_identical_logits(llama_dir: Path) -> None:
    original = tiny_model("llama", seed=1)
    model, tokenizer = load_model(llama_dir)
    assert tokenizer is None  # the tiny folder has no tokenizer files
    assert not model.training
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, original(_ids()).logits)
    model2, _ = load_model(str(llama_dir))  # str and PathLike alike
    assert torch.equal(model2.model.layers[1].mlp.down_proj.weight, original.model.layers[1].mlp.down_proj.weight)


def test_dtype_is_applied(llama_dir: Path) -> None:
    model, _ = load_model(llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_dtype_and_device_are_config_errors(llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_model(llama_dir, dtype=torch.int8)
    with pytest.raises(ConfigError, match="device"):
        load_model(llama_dir, device="not-a-device")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_tiny_arch_round_trips_through_a_folder(tmp_path: Path, arch: str) -> None:
    original = tiny_model(arch, seed=2)
    original.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path)
    assert type(model) is type(original)  # causal LMs via AutoModelForCausalLM, encoders via AutoModel
    with torch.no_grad():
        a, b = original(input_ids=_ids()), model(input_ids=_ids())
    key = "logits" if get_adapter(model).kind == "causal_lm" else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))


def test_resolve_alias() -> None:
    assert resolve_alias("not-an-alias") is None
    assert resolve_alias("SmolLM2-135M") == resolve_alias("smollm2-135m")  # case-insensitive
    minilm = resolve_alias("minilm-l6")
    assert minilm is not None and (minilm / "config.json").is_file()
    assert set(ALIASES) == {"smollm2-135m", "minilm-l6"}


def test_minilm_alias_loads_bert_encoder() -> None:
    model, tokenizer = load_model("minilm-l6")
    assert model.config.model_type == "bert"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert len(get_adapter(model).linear_names(model)) == 36
    enc = tokenizer("Hello world", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (1, enc["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()


@pytest.mark.slow
def test_smollm2_alias_loads_dequantized_float32_llama() -> None:
    model, tokenizer = load_model("smollm2-135m")
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert not model.training
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    assert len(get_adapter(model).linear_names(model)) == 30 * 7
    ids = tokenizer("Hello world")["input_ids"]
    assert ids == [19556, 905]  # no BOS is added, as with the Hugging Face SmolLM2 tokenizer
    assert tokenizer.decode(ids) == "Hello world"
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("The capital of France is")["input_ids"]])).logits
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


# ------------------------------------------------------------------------------------------------- bad sources


@pytest.mark.parametrize("source", ["/no/such/dir", "./no-such-model", "missing.gguf", "sub/missing.safetensors"])
def test_missing_path(source: str) -> None:
    with pytest.raises(ModelSourceError, match="does not exist") as info:
        load_model(source)
    assert "Supported sources" in str(info.value)


def test_missing_pathlike(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model(tmp_path / "nothing-here")


@pytest.mark.parametrize("fraction", [0.5, 0.001])
def test_truncated_gguf(tmp_path: Path, smollm2_gguf: Path, fraction: float) -> None:
    size = smollm2_gguf.stat().st_size
    with smollm2_gguf.open("rb") as f:
        head = f.read(int(size * fraction))
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(head)
    with pytest.raises(ModelSourceError, match="corrupt or truncated GGUF") as info:
        load_model(bad)
    assert info.value.__cause__ is not None  # the reader's own error stays chained


def test_garbage_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        load_model(bad)
    bad.write_bytes(b"GGUF" + os.urandom(4096))  # right magic, nonsense after it
    with pytest.raises(ModelSourceError, match="corrupt or truncated GGUF"):
        load_model(bad)


def test_folder_with_truncated_safetensors(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="truncated"):
        load_model(tmp_path)
    weights.write_bytes(data[:4])
    with pytest.raises(ModelSourceError, match="not a valid safetensors"):
        load_model(tmp_path)


def test_folder_with_missing_weights_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match="missing from the checkpoint"):
        load_model(tmp_path)


def test_folder_with_only_pytorch_bin_is_refused(tmp_path: Path, llama_dir: Path) -> None:
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    sentinel = tmp_path / "unpickled"

    class Trap:  # unpickling this would create the sentinel file
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (sentinel,))

    torch.save({"trap": Trap()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="only pickled weights") as info:
        load_model(tmp_path)
    assert "safe_serialization=True" in str(info.value)
    assert not sentinel.exists()


def test_bad_config_json(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelSourceError, match="no 'model_type'"):
        load_model(tmp_path)


def test_config_that_does_not_match_weights(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="loading the weights failed") as info:
        load_model(tmp_path)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("source", ["smollm3", "gpt-5", "llama"])
def test_unknown_alias_lists_aliases(source: str) -> None:
    with pytest.raises(ModelSourceError, match="not a known alias") as info:
        load_model(source)
    assert all(name in str(info.value) for name in ALIASES)


def test_unsupported_architecture_folder(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path, safe_serialization=True
    )
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported") as info:
        load_model(tmp_path)
    assert "llama" in str(info.value) and "bert" in str(info.value)


def test_folder_without_config_and_loose_files(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(ModelSourceError, match="without config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelSourceError, match="pass the folder"):
        load_model(llama_dir / "model.safetensors")


def test_hub_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ModelSourceError, match="hub id") as info:
        load_model("some-org/some-model")
    assert isinstance(info.value.__cause__, OSError)


# ------------------------------------------------------------------------------------------ native checkpoints


def test_native_checkpoint_without_io_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tensorslim.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tensorslim.io.checkpoint", None)  # makes the import fail
    with pytest.raises(ModelSourceError, match="checkpoint loading is not available"):
        load_model(tmp_path)


def test_native_checkpoint_is_dispatched_to_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tensorslim.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")  # the manifest wins over config.json
    calls: list[Path] = []
    model = tiny_model("llama")

    def load(path: Path, *, device: torch.device) -> tuple[nn.Module, None]:
        calls.append(path)
        return model, None

    import tensorslim.io  # noqa: F401 - the parent package must be importable

    monkeypatch.setitem(sys.modules, "tensorslim.io.checkpoint", types.SimpleNamespace(load=load))
    loaded, tokenizer = load_model(tmp_path)
    assert loaded is model and tokenizer is None and calls == [tmp_path]
