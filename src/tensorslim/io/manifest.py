"""The ``tensorslim.json`` manifest of a native checkpoint: a versioned JSON schema and its validation.

Design: the manifest is plain JSON (no pickle, no code, no class paths). Everything in it that decides what gets built
is resolved against an allowlist: formats through :func:`tensorslim.formats.format_from_dict` (registered families
only, declared fields only), the model class through the ``transformers`` classes whose config ``model_type`` matches
the stored config. ``digest`` is the sha256 of the canonical JSON of the manifest without the digest itself, so a
bit flip anywhere in the file is detected before anything is built; each shard carries its own sha256 and size.

Schema (version 1)::

    {"schema": "tensorslim.checkpoint", "schema_version": 1, "tensorslim_version": "0.1.0",
     "model": {"class": "LlamaForCausalLM", "model_type": "llama", "config": {...}, "source": str|null,
               "absent": [submodules the class builds that the model lacks, e.g. BERT's pooler]},
     "tokenizer": {"files": {name: sha256}} | null,
     "layers": {name: {"format": Format.to_dict(), "method": str|null, "shape": [out, in], "bias": bool,
                       "tensors": [tensor names]}},
     "tied": {alias parameter: canonical parameter},
     "shards": [{"file": "model-00001-of-00001.safetensors", "sha256": hex, "size": bytes,
                 "tensors": {name: {"dtype": "float16", "shape": [...]}}}],
     "plan": any JSON | null, "report": any JSON | null, "extra": {...},
     "digest": hex}

Limits: the schema is validated by hand (no jsonschema dependency); unknown top-level keys are refused so a newer
writer's manifest fails loudly instead of being half understood.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..formats.base import Format
from ..formats.registry import format_from_dict

SCHEMA = "tensorslim.checkpoint"
SCHEMA_VERSION = 1
MANIFEST_NAME = "tensorslim.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

_KEYS = {"schema", "schema_version", "tensorslim_version", "model", "tokenizer", "layers", "tied", "shards", "plan",
         "report", "extra", "digest"}
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu",
           "float4_e2m1fn_x2", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool"}
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)


def digest_of(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def finalize(manifest: dict[str, Any]) -> str:
    """The manifest text to write: the digest filled in, canonical (deterministic) JSON."""
    out = dict(manifest)
    try:  # the digest serializes the same values first, so its failure is this one (e.g. keys of mixed types)
        out["digest"] = digest_of(out)
        return canonical_json(out) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the manifest is not plain JSON (plan/report/extra must be JSON values): {e}") from e


def parse(text: bytes) -> dict[str, Any]:
    """Parse and validate manifest bytes; every problem is a :class:`CheckpointError` naming the field."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{MANIFEST_NAME} is {len(text)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        m = json.loads(text.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{MANIFEST_NAME} is not valid JSON ({e}); the checkpoint is corrupt") from e
    validate(m)
    return m


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _fail(field: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{MANIFEST_NAME}: {field}: {msg}; the checkpoint is corrupt or from another tool")


def _need(d: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise _fail(f"{where}{key}", "missing")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
        raise _fail(f"{where}{key}", f"expected {_names(types)}, got {type(v).__name__}")
    return v


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _names(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in _as_tuple(t))


def validate(m: Any) -> None:
    if not isinstance(m, dict):
        raise _fail("<root>", f"expected an object, got {type(m).__name__}")
    if m.get("schema") != SCHEMA:
        raise _fail("schema", f"expected {SCHEMA!r}, got {m.get('schema')!r}")
    version = _need(m, "schema_version", int, "")
    if version != SCHEMA_VERSION:
        raise _fail("schema_version", f"this tensorslim reads version {SCHEMA_VERSION}, the file is version {version}")
    unknown = set(m) - _KEYS
    if unknown:
        raise _fail("<root>", f"unknown keys {sorted(unknown)}")
    digest = _need(m, "digest", str, "")
    if digest != digest_of(m):
        raise _fail("digest", "does not match the manifest's content (the file was modified or damaged)")
    _need(m, "tensorslim_version", str, "")
    model = _need(m, "model", dict, "")
    for key in ("class", "model_type"):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", _need(model, key, str, "model.")):
            raise _fail(f"model.{key}", "not an identifier")
    config = _need(model, "config", dict, "model.")
    if config.get("model_type") != model["model_type"]:
        raise _fail("model.config.model_type", f"{config.get('model_type')!r} != model.model_type")
    absent = _need(model, "absent", list, "model.")
    if not all(isinstance(a, str) and re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", a) for a in absent):
        raise _fail("model.absent", "expected a list of module names")
    if model.get("source") is not None and not isinstance(model["source"], str):
        raise _fail("model.source", "expected a string or null")
    tok = m.get("tokenizer")
    if tok is not None:
        files = _need(_need(m, "tokenizer", dict, ""), "files", dict, "tokenizer.")
        for name, sha in files.items():
            if not _FILE_NAME.fullmatch(name) or name.startswith(".") or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
                raise _fail("tokenizer.files", f"bad entry {name!r}")
    shards = _need(m, "shards", list, "")
    stored: set[str] = set()
    seen_files: set[str] = set()
    for i, s in enumerate(shards):
        where = f"shards[{i}]."
        if not isinstance(s, dict) or set(s) != {"file", "sha256", "size", "tensors"}:
            raise _fail(f"shards[{i}]", "expected an object with file, sha256, size, tensors")
        if not _SHARD_NAME.fullmatch(_need(s, "file", str, where)) or s["file"] in seen_files:
            raise _fail(f"{where}file", f"bad or repeated shard name {s['file']!r}")
        seen_files.add(s["file"])
        if not _HEX64.fullmatch(_need(s, "sha256", str, where)):
            raise _fail(f"{where}sha256", "not a lowercase hex sha256")
        if _need(s, "size", int, where) < 8:
            raise _fail(f"{where}size", f"{s['size']} is too small for a safetensors file")
        for t, desc in _need(s, "tensors", dict, where).items():
            if not t or t in stored:
                raise _fail(f"{where}tensors", f"bad or repeated tensor name {t!r}")
            if (not isinstance(desc, dict) or set(desc) != {"dtype", "shape"} or not isinstance(desc["dtype"], str)
                    or desc["dtype"] not in _DTYPES
                    or not isinstance(desc["shape"], list)
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in desc["shape"])):
                raise _fail(f"{where}tensors[{t!r}]", f"expected {{dtype, shape}}, got {desc!r}")
            stored.add(t)
    layers = _need(m, "layers", dict, "")
    claimed: set[str] = set()
    for name, entry in layers.items():
        where = f"layers[{name!r}]."
        if not isinstance(entry, dict) or set(entry) != {"format", "method", "shape", "bias", "tensors"}:
            raise _fail(f"layers[{name!r}]", "expected an object with format, method, shape, bias, tensors")
        layer_format(entry, name)
        if entry["method"] is not None and not isinstance(entry["method"], str):
            raise _fail(f"{where}method", "expected a string or null")
        shape = _need(entry, "shape", list, where)
        if len(shape) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < 2**31 for x in shape):
            raise _fail(f"{where}shape", f"expected two positive integers, got {shape!r}")
        _need(entry, "bias", bool, where)
        names = _need(entry, "tensors", list, where)
        for t in names:
            full = f"{name}.{t}" if isinstance(t, str) else None
            if full is None or full not in stored or full in claimed:
                raise _fail(f"{where}tensors", f"{t!r} is not stored in any shard (or listed twice)")
            claimed.add(full)
        if entry["bias"] and f"{name}.bias" not in stored:
            raise _fail(f"{where}bias", "the layer has a bias but no shard stores it")
    tied = _need(m, "tied", dict, "")
    for alias, canon in tied.items():
        if not isinstance(canon, str) or canon not in stored or alias in stored:
            raise _fail("tied", f"{alias!r} -> {canon!r} must point from an unstored name to a stored tensor")
    for key in ("extra",):
        _need(m, key, dict, "")


def layer_format(entry: dict[str, Any], name: str) -> Format:
    """The layer's format, rebuilt through the format allowlist."""
    try:
        return format_from_dict(entry["format"])
    except (ConfigError, TypeError, ValueError, KeyError, RecursionError) as e:
        raise _fail(f"layers[{name!r}].format", f"not an allowed format ({e})") from e
