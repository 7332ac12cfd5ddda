"""Fuzzing ``load``: truncated, bit-flipped and shape-inconsistent shards and manifests.

Every case must end in a :class:`CheckpointError` or in a model whose logits equal the original's (never another
exception, a hang, or a silently different model). Mutations that re-sign the files (recomputed sha256 / digest) are
adversarial edits; they stay out of ``model.config`` (a re-signed config edit is a legitimate, different model). A
re-signed shard whose tensors keep their names, dtypes and shapes but not their values is such a legitimate, different
checkpoint too: it must be refused or load into a model that runs.
About 2,400 cases in total.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorslim.errors import CheckpointError
from tensorslim.io import load, save
from tensorslim.io import manifest as mf

from .helpers import compress_linears, logits

SETTINGS = dict(deadline=None, derandomize=False, suppress_health_check=list(HealthCheck), database=None)
SHARD = "model-00001-of-00001.safetensors"


class Case:
    def __init__(self) -> None:
        import transformers as hf

        torch.manual_seed(0)
        cfg = hf.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        model = hf.LlamaForCausalLM(cfg).eval()
        compress_linears(model, "int4:g32", under="model.layers.0.self_attn")
        compress_linears(model, "int4:g32:sym+lowrank:r4", under="model.layers.0.mlp")
        self.tokens = torch.randint(0, 32, (1, 7), generator=torch.Generator().manual_seed(0))
        self.ref = logits(model, self.tokens)
        self.root = Path(tempfile.mkdtemp(prefix="tsfuzz"))
        save(model, self.root / "good")
        self.manifest_bytes = (self.root / "good" / mf.MANIFEST_NAME).read_bytes()
        self.manifest = json.loads(self.manifest_bytes)
        self.shard = (self.root / "good" / SHARD).read_bytes()
        self.work = self.root / "work"
        self.work.mkdir()

    def write(self, manifest: bytes, shard: bytes) -> Path:
        (self.work / mf.MANIFEST_NAME).write_bytes(manifest)
        (self.work / SHARD).write_bytes(shard)
        return self.work

    def check(self, manifest: bytes, shard: bytes, *, must_fail: bool = False, expect_same: bool = True) -> None:
        folder = self.write(manifest, shard)
        try:
            model, _ = load(folder)
        except CheckpointError:
            return
        assert not must_fail, "a damaged checkpoint loaded"
        out = logits(model, self.tokens)
        if expect_same:
            assert torch.equal(out, self.ref), "a modified checkpoint loaded as a different model"


@pytest.fixture(scope="module")
def case():
    c = Case()
    yield c
    shutil.rmtree(c.root, ignore_errors=True)


def test_reference_loads(case: Case):
    case.check(case.manifest_bytes, case.shard)
    model, _ = load(case.work)
    assert torch.equal(logits(model, case.tokens), case.ref)


@settings(max_examples=400, **SETTINGS)
@given(data=st.data())
def test_truncated_files(case: Case, data):
    which = data.draw(st.sampled_from(["shard", "manifest"]))
    if which == "shard":
        n = data.draw(st.integers(0, len(case.shard) - 1))
        case.check(case.manifest_bytes, case.shard[:n], must_fail=True)
    else:
        n = data.draw(st.integers(0, len(case.manifest_bytes) - 2))  # the last byte is a newline
        case.check(case.manifest_bytes[:n], case.shard, must_fail=True)


@settings(max_examples=500, **SETTINGS)
@given(data=st.data())
def test_bit_flips(case: Case, data):
    which = data.draw(st.sampled_from(["shard", "manifest"]))
    blob = bytearray(case.shard if which == "shard" else case.manifest_bytes)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 7)), min_size=1, max_size=3))
    for pos, bit in flips:
        blob[pos] ^= 1 << bit
    if which == "shard":
        case.check(case.manifest_bytes, bytes(blob), must_fail=bytes(blob) != case.shard)
    else:
        case.check(bytes(blob), case.shard)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if prefix == ("model", "config"):
        return out[:0]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["int", "sum", "lowrank", "codes", "scales", "float16", "llama"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _resign(m: dict) -> bytes:
    return mf.finalize(m).encode()


@settings(max_examples=700, **SETTINGS)
@given(data=st.data())
def test_resigned_manifest_edits(case: Case, data):
    m = copy.deepcopy(case.manifest)
    m.pop("digest")
    paths = [p for p in _paths(m) if p]
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(paths))
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            op = data.draw(st.sampled_from(["replace", "delete", "int+1", "swap"]))
            leaf = path[-1]
            if op == "delete":
                del parent[leaf]
            elif op == "int+1" and isinstance(parent[leaf], int) and not isinstance(parent[leaf], bool):
                parent[leaf] += data.draw(st.sampled_from([-1, 1, 16, 2**31]))
            elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
                parent.reverse()
            else:
                parent[leaf] = data.draw(_JSON)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed the path
    try:
        blob = _resign(m)
    except CheckpointError:
        return  # not JSON-serializable; nothing to write
    case.check(blob, case.shard)


def _tensor(data, dtype_names=("uint8", "float16", "float32", "int16", "int32", "bfloat16")) -> torch.Tensor:
    dtype = getattr(torch, data.draw(st.sampled_from(dtype_names)))
    shape = data.draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
    return torch.zeros(shape, dtype=torch.float32).to(dtype) + (1 if data.draw(st.booleans()) else 0)


@settings(max_examples=600, **SETTINGS)
@given(data=st.data())
def test_resigned_inconsistent_shards(case: Case, data):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = st_load(case.shard)
    m = copy.deepcopy(case.manifest)
    names = sorted(tensors)
    op = data.draw(st.sampled_from(["reshape", "retype", "replace", "drop", "add", "rename"]))
    name = data.draw(st.sampled_from(names))
    t = tensors[name]
    if op == "reshape" and t.numel() > 1:
        tensors[name] = t.flatten()[: data.draw(st.integers(0, t.numel() - 1))].clone()
    elif op == "retype":
        tensors[name] = t.to(getattr(torch, data.draw(st.sampled_from(["uint8", "float16", "float32", "int32"])))).clone()
    elif op == "replace":
        tensors[name] = _tensor(data)
    elif op == "drop":
        del tensors[name]
    elif op == "add":
        tensors[data.draw(st.sampled_from([name + ".x", "extra", "model.layers.0.self_attn.q_proj.zeros2"]))] = _tensor(data)
    else:
        tensors[data.draw(st.sampled_from([n for n in names if n != name]))] = tensors.pop(name)
    blob = st_save(tensors, metadata={"format": "pt"})
    if data.draw(st.booleans()):  # the attacker also fixes the manifest's tensor names (declared dtypes/shapes kept)
        listing = m["shards"][0]["tensors"]
        m["shards"][0]["tensors"] = {
            k: listing.get(k, {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)})
            for k, v in tensors.items()}
    m["shards"][0]["sha256"] = hashlib.sha256(blob).hexdigest()
    m["shards"][0]["size"] = len(blob)
    m.pop("digest")
    original = st_load(case.shard)
    consistent = set(tensors) == set(names) and all(
        tensors[k].dtype == v.dtype and tensors[k].shape == v.shape for k, v in original.items())
    same = consistent and all(torch.equal(tensors[k], v) for k, v in original.items())
    if consistent and not same:
        # new values under the same names, dtypes and shapes, re-signed: a legitimate, different checkpoint (a
        # replaced norm weight, say); it must load or be refused with a CheckpointError, nothing else
        case.check(_resign(m), blob, expect_same=False)
        return
    try:
        case.check(_resign(m), blob, must_fail=not same)
    except AssertionError:
        raise
