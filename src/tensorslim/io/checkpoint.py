"""Native checkpoints: ``save(model, dir)`` / ``load(dir)`` with bit-identical logits.

Layout of a checkpoint folder::

    tensorslim.json                       manifest (see :mod:`.manifest`), written last
    model-00001-of-0000N.safetensors      every stored tensor, sharded by size
    tokenizer/                            the tokenizer's own save_pretrained files (optional)

Stored tensors: for each ``CompressedLinear`` at ``<layer>`` its ``compressed.tensors()`` as ``<layer>.<name>``
(packed codes, scales, zeros, masks, factors exactly as held in memory, nested parts as ``<layer>.base.codes``);
then every parameter and buffer of the model (non-persistent buffers too, so nothing is recomputed on load), with
tied tensors stored once and listed in ``tied``. ``load`` rebuilds the architecture from the stored config on the meta
device (no random init, no memory), swaps in ``CompressedLinear`` modules built by
``weight_class(fmt).from_tensors`` (which validates shapes, dtypes and byte counts), and assigns every stored tensor
(no copy). Shards are written one at a time (``max_shard_bytes``), so memory holds at most one extra shard.

Integrity: the folder is written through :func:`.atomic.atomic_folder`; ``load`` checks the manifest digest, each
shard's size and sha256, the tensor names of each shard's header against the manifest, every shape against the
architecture, and refuses leftover or missing tensors. Nothing is unpickled or executed: formats and the model class
come from allowlists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import CheckpointError, TensorslimError
from ..formats.base import CompressedWeight, weight_class
from ..formats.module import CompressedLinear
from . import manifest as mf
from .atomic import atomic_folder, recover

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENIZER_DIR = "tokenizer"


# ------------------------------------------------------------------------------------------------ collecting state


def collect_state(model: nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """``(tensors, layers, tied)`` of ``model``: what a checkpoint (or a resume step) stores.

    ``layers`` maps each CompressedLinear to its manifest entry; ``tied`` maps repeated parameters to the name
    under which the shared tensor is stored.
    """
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, mod in model.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(mod, CompressedLinear):
            cw = mod.compressed
            parts = cw.tensors()
            for k, t in parts.items():
                tensors[f"{name}.{k}"] = t
            layers[name] = {"format": cw.format.to_dict(), "method": mod.method, "shape": list(cw.shape),
                            "bias": mod.bias is not None, "tensors": sorted(parts)}
    tied: dict[str, str] = {}
    owner: dict[int, str] = {}
    named = list(model.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False))
    named += list(model.named_buffers(prefix=prefix.rstrip("."), remove_duplicate=False))
    for name, t in named:
        if id(t) in owner:
            tied[name] = owner[id(t)]
            continue
        if name in tensors:
            raise CheckpointError(f"tensor name {name!r} is used by a compressed layer and by a parameter/buffer")
        owner[id(t)] = name
        tensors[name] = t.detach()
    return tensors, layers, tied


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, Any]]:
    """Write safetensors shards into ``folder`` one at a time; return their manifest entries."""
    from safetensors.torch import save as st_save

    plan = _plan_shards(tensors, max_bytes)
    entries = []
    for i, names in enumerate(plan):
        part: dict[str, torch.Tensor] = {}
        storages: set[tuple[int, int]] = set()
        for n in names:
            t = tensors[n].detach().to("cpu").contiguous()
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (0, id(t))
            if key in storages:
                t = t.clone()
            storages.add(key)
            part[n] = t
        data = st_save(part, metadata={"format": "pt"})
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        with open(folder / file, "wb") as f:
            f.write(data)
        listing = {n: {"dtype": str(part[n].dtype).removeprefix("torch."), "shape": list(part[n].shape)} for n in names}
        entries.append({"file": file, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "tensors": listing})
        del data, part
    return entries


# ------------------------------------------------------------------------------------------------------------ save


def save(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    source: str | None = None,
    plan: Any = None,
    report: Any = None,
    manifest_extra: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (a transformers model, possibly with CompressedLinear layers) as a native checkpoint.

    ``plan``/``report``/``manifest_extra`` must be JSON values (pass ``report.to_dict()``). Returns the folder.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not getattr(config, "model_type", None):
        raise CheckpointError(f"{type(model).__name__} has no transformers config; only transformers models can be saved")
    if max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    tensors, layers, tied = collect_state(model)
    manifest: dict[str, Any] = {
        "schema": mf.SCHEMA,
        "schema_version": mf.SCHEMA_VERSION,
        "tensorslim_version": __version__,
        "model": {"class": type(model).__name__, "model_type": config.model_type,
                  "config": json.loads(config.to_json_string(use_diff=False)),
                  "source": None if source is None else str(source), "absent": _absent_modules(model)},
        "tokenizer": None,
        "layers": layers,
        "tied": tied,
        "shards": [],
        "plan": _jsonable(plan, "plan"),
        "report": _jsonable(report, "report"),
        "extra": _jsonable(manifest_extra or {}, "manifest_extra"),
    }
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        manifest["shards"] = write_shards(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            manifest["tokenizer"] = {"files": _save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)}
        text = mf.finalize(manifest)
        mf.validate(json.loads(text))  # the writer never produces a checkpoint its own reader refuses
        (tmp / mf.MANIFEST_NAME).write_text(text, encoding="utf-8")
    logger.info("saved %d tensors (%d compressed layers) in %d shard(s) to %s", len(tensors), len(layers),
                len(manifest["shards"]), folder)
    return Path(folder)


def _absent_modules(model: nn.Module) -> list[str]:
    """Submodules that ``type(model)(config)`` builds but ``model`` lacks (``BertModel(add_pooling_layer=False)``)."""
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except Exception as e:  # noqa: BLE001 - a model that cannot be rebuilt from its config cannot be loaded either
        raise CheckpointError(f"{type(model).__name__} cannot be rebuilt from its config ({e}); it cannot be saved") from e
    have = {n for n, _ in model.named_modules()}
    absent: list[str] = []
    for n, _ in fresh.named_modules():
        if n and n not in have and not any(n.startswith(a + ".") for a in absent):
            absent.append(n)
    return absent


def _jsonable(value: Any, what: str) -> Any:
    if value is None:
        return None
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        value = value.to_dict()
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} must be a JSON value (dicts, lists, str, finite numbers): {e}") from e


def _save_tokenizer(tokenizer: Any, folder: Path) -> dict[str, str]:
    folder.mkdir()
    tokenizer.save_pretrained(str(folder))
    files = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not re.fullmatch(r"[A-Za-z0-9_.\-]+", p.name) or p.name.startswith("."):
            raise CheckpointError(f"tokenizer.save_pretrained wrote {p.name!r}, which a checkpoint cannot hold")
        files[p.name] = _sha256_file(p)
    return files


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------ load


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of a checkpoint folder (shards are not read)."""
    folder = Path(folder)
    if not folder.exists():
        recover(folder)
    path = folder / mf.MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a tensorslim checkpoint: it has no {mf.MANIFEST_NAME}")
    try:
        with open(path, "rb") as f:
            text = f.read(mf.MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    return mf.parse(text)


def read_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every stored tensor, after checking each shard's size, sha256 and header against the manifest."""
    from safetensors.torch import load as st_load

    out: dict[str, torch.Tensor] = {}
    for s in manifest["shards"]:
        path = folder / s["file"]
        try:
            size = path.stat().st_size
            if size != s["size"]:
                raise CheckpointError(f"{path} is {size} bytes, the manifest says {s['size']} (truncated or replaced)")
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CheckpointError(f"cannot read shard {path}: {e}") from e
        if hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise CheckpointError(f"{path} fails its sha256 check; the checkpoint is corrupt")
        try:
            part = st_load(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for malformed files
            raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from e
        if sorted(part) != sorted(s["tensors"]):
            raise CheckpointError(f"{path} holds tensors {sorted(part)[:5]}..., not the ones its manifest lists")
        for name, t in part.items():
            want = s["tensors"][name]
            if str(t.dtype).removeprefix("torch.") != want["dtype"] or list(t.shape) != want["shape"]:
                raise CheckpointError(f"{path}: {name} is {t.dtype} {list(t.shape)}, the manifest says "
                                      f"{want['dtype']} {want['shape']}")
        out.update(part)
    return out


def _model_class(manifest: dict[str, Any]) -> type:
    import transformers
    from transformers import PreTrainedModel

    name, model_type = manifest["model"]["class"], manifest["model"]["model_type"]
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError) as e:
        raise CheckpointError(f"model class {name!r} is not a transformers class ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)) or getattr(cls.config_class, "model_type", None) != model_type:
        raise CheckpointError(f"model class {name!r} is not a transformers model of type {model_type!r}")
    return cls


def _check_depth(config: Any, names: list[str]) -> None:
    """Refuse configs asking for more blocks than the shards hold (a forged config must not build a huge model)."""
    depth = 1 + max((int(p) for n in names for p in n.split(".") if p.isdigit() and len(p) < 7), default=-1)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > max(depth, 1):
            raise CheckpointError(f"config {key}={v} but the shards hold tensors of {depth} blocks")


def build_empty(manifest: dict[str, Any], stored_names: list[str]) -> nn.Module:
    cls = _model_class(manifest)
    try:
        config = cls.config_class.from_dict(dict(manifest["model"]["config"]))
        _check_depth(config, stored_names)
        with torch.device("meta"):
            model = cls(config)
    except TensorslimError:
        raise
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build is a corrupt checkpoint
        raise CheckpointError(f"cannot build {cls.__name__} from the stored config ({type(e).__name__}: {e})") from e
    for name in manifest["model"]["absent"]:
        parent, _, leaf = name.rpartition(".")
        try:
            holder = model.get_submodule(parent) if parent else model
        except AttributeError:
            raise CheckpointError(f"model.absent names {name!r}, which {cls.__name__} does not have") from None
        if leaf not in holder._modules:
            raise CheckpointError(f"model.absent names {name!r}, which {cls.__name__} does not have")
        setattr(holder, leaf, None)
    return model


def apply_state(model: nn.Module, layers: dict[str, Any], tensors: dict[str, torch.Tensor], tied: dict[str, str],
                *, prefix: str = "", strict: bool = True) -> None:
    """Swap in CompressedLinear modules for ``layers`` and assign ``tensors`` (names relative to ``model``).

    ``prefix`` is removed from every name first (a resume step stores one block under its full name).
    """
    def rel(n: str) -> str:
        return n[len(prefix):] if prefix and n.startswith(prefix) else n

    used: set[str] = set()
    for name, entry in layers.items():
        fmt = mf.layer_format(entry, name)
        shape = tuple(entry["shape"])
        parts = {t: tensors.get(f"{name}.{t}") for t in entry["tensors"]}
        missing = [t for t, v in parts.items() if v is None]
        if missing:
            raise CheckpointError(f"layer {name!r}: stored tensors lack {missing}")
        try:
            old = model.get_submodule(rel(name))
        except AttributeError:
            raise CheckpointError(f"layer {name!r} does not exist in {type(model).__name__}") from None
        if isinstance(old, nn.Linear):
            want = (old.out_features, old.in_features)
            has_bias = old.bias is not None
        elif isinstance(old, CompressedLinear):
            want, has_bias = (old.out_features, old.in_features), old.bias is not None
        else:
            raise CheckpointError(f"layer {name!r} is a {type(old).__name__}, not a Linear")
        if want != shape or has_bias != entry["bias"]:
            raise CheckpointError(f"layer {name!r}: stored shape {shape} bias={entry['bias']}, the model has "
                                  f"{want} bias={has_bias}")
        try:
            reason = fmt.supports(shape)
            if reason is not None:
                raise CheckpointError(f"layer {name!r}: {reason}")
            cw: CompressedWeight = weight_class(fmt).from_tensors(fmt, shape, parts)  # type: ignore[arg-type]
        except CheckpointError:
            raise
        except (TensorslimError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"layer {name!r} ({fmt.spec()}): stored tensors are inconsistent ({e})") from e
        new = CompressedLinear(cw, None, method=entry["method"])
        if entry["bias"]:
            new.bias = nn.Parameter(torch.empty(shape[0], device="meta"), requires_grad=False)
        _set_module(model, rel(name), new)
        used.update(f"{name}.{t}" for t in entry["tensors"])
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    expected = [*params, *buffers]
    shared: dict[str, nn.Parameter] = {}
    for r in expected:
        full = prefix + r
        key = tied.get(full, full)
        t = tensors.get(key)
        if t is None:
            if strict:
                raise CheckpointError(f"the checkpoint has no tensor for {full!r}")
            continue
        cur = params.get(r, buffers.get(r))
        if tuple(t.shape) != tuple(cur.shape):
            raise CheckpointError(f"{full!r}: stored shape {tuple(t.shape)}, the model needs {tuple(cur.shape)}")
        if cur.dtype.is_floating_point != t.dtype.is_floating_point:
            raise CheckpointError(f"{full!r}: stored dtype {t.dtype} cannot stand for {cur.dtype}")
        mod_name, _, leaf = r.rpartition(".")
        mod = model.get_submodule(mod_name)
        if r in params:
            if key not in shared:  # one Parameter per stored tensor, so tied names share it as when saved
                shared[key] = nn.Parameter(t, requires_grad=False)
            mod._parameters[leaf] = shared[key]
        else:
            mod._buffers[leaf] = t
        used.add(key)
    unused = sorted(set(tensors) - used)
    if strict and unused:
        raise CheckpointError(f"the checkpoint stores tensors the model has no place for: {unused[:5]}")


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def load(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load a native checkpoint: ``(model, tokenizer or None)``, the model in eval mode on ``device``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    tensors = read_tensors(folder, manifest)
    model = build_empty(manifest, list(tensors))
    apply_state(model, manifest["layers"], tensors, manifest["tied"])
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"the checkpoint leaves {leftover[:5]} uninitialized")
    model = model.to(device).eval()
    tokenizer = _load_tokenizer(folder, manifest)
    return model, tokenizer


def _load_tokenizer(folder: Path, manifest: dict[str, Any]) -> Any:
    tok = manifest.get("tokenizer")
    if tok is None:
        return None
    tdir = folder / TOKENIZER_DIR
    for name, sha in tok["files"].items():
        p = tdir / name
        if not p.is_file() or _sha256_file(p) != sha:
            raise CheckpointError(f"tokenizer file {p} is missing or fails its sha256 check")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tdir), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load the tokenizer stored in {tdir} ({type(e).__name__}: {e})") from e
