"""Resumable compression: per-block progress that makes an interrupted ``compress`` resume bit-identically.

Design choice: after block ``i`` the runner calls ``on_block_done(i, model, cache)``. We persist
1. the finished block: every tensor of ``blocks[i]`` (compressed tensors of its CompressedLinear layers and its dense
   parameters/buffers, in the checkpoint serialization of :mod:`.checkpoint`) as ``block-<i>.safetensors``;
2. the *activations entering block i+1* (the ``hidden`` tensor of every cached calibration batch) as
   ``inputs.safetensors``, replaced at every block (only the latest is needed);
3. ``progress.json``: the command's fingerprint, each block file's sha256, the inputs file's sha256, ``last_done``.
Every file is written atomically (temp file + fsync + rename) and ``progress.json`` last, so a kill at any point leaves
a consistent state whose ``last_done`` is a block whose files are complete.

On resume, :meth:`BlockProgress.restore` swaps the saved blocks into the freshly loaded base model and returns
``start_block = last_done + 1``; :meth:`BlockProgress.initial_inputs` gives the saved hidden states with the keyword
arguments (attention mask, position embeddings) of a fresh capture: those depend only on the embeddings and the token
ids, which compression does not touch. Persisting the activations rather than recomputing them by re-running blocks
``0..i`` makes the resumed run bit-identical by construction (no reliance on the replay taking the same floating
point path) at the cost of one ``[n_samples, seq_len, hidden]`` file (150 MB for SmolLM2 at 128 x 512).

Limits: parameters outside the blocks (embeddings, head, final norm) are assumed unchanged by block-wise compression;
the fingerprint (source, methods, formats, data hash, seed, ...) is supplied by the caller and compared verbatim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from . import manifest as mf
from .atomic import fsync_dir, write_bytes_atomic
from .checkpoint import apply_state, collect_state

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"
INPUTS = "inputs.safetensors"
_SCHEMA = "tensorslim.progress"


def progress_dir_for(out: str | os.PathLike[str]) -> Path:
    """Where ``compress -o OUT --resume`` keeps its progress: a hidden sibling of ``OUT``."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.progress"


class BlockProgress:
    """Progress of one compression command, stored in ``folder`` (see the module note)."""

    def __init__(self, folder: str | os.PathLike[str], *, fingerprint: dict[str, Any], blocks: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.blocks = blocks
        self._state = self._read()

    # -- reading ----------------------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        path = self.folder / PROGRESS
        if not path.is_file():
            return {"schema": _SCHEMA, "fingerprint": self.fingerprint, "blocks": {}, "inputs": None, "last_done": -1}
        try:
            state = json.loads(path.read_bytes())
            ok = state.get("schema") == _SCHEMA and state.get("digest") == mf.digest_of(state)
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path} is unreadable ({e}); delete {self.folder} to start over") from e
        if not ok:
            raise CheckpointError(f"{path} is corrupt; delete {self.folder} to start over")
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointError(
                f"{self.folder} holds the progress of a different command (fingerprint {state['fingerprint']}); "
                f"run without --resume, or delete {self.folder}")
        return state

    @property
    def start_block(self) -> int:
        return int(self._state["last_done"]) + 1

    def _load_file(self, name: str, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"progress file {path} is missing ({e}); delete {self.folder} to start over") from e
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"progress file {path} fails its sha256 check; delete {self.folder} to start over")
        return st_load(data)

    def restore(self, model: nn.Module) -> int:
        """Swap the saved blocks ``0..last_done`` into ``model`` (the freshly loaded base); return ``start_block``."""
        for key, entry in sorted(self._state["blocks"].items(), key=lambda kv: int(kv[0])):
            i = int(key)
            if i > self._state["last_done"]:
                continue
            tensors = self._load_file(entry["file"], entry)
            block = model.get_submodule(f"{self.blocks}.{i}")
            apply_state(block, entry["layers"], tensors, entry["tied"], prefix=f"{self.blocks}.{i}.")
        if self.start_block:
            logger.info("resuming after block %d from %s", self.start_block - 1, self.folder)
        return self.start_block

    def initial_inputs(self, fresh: list[Any]) -> list[Any] | None:
        """The saved hidden states entering ``start_block``, with the kwargs of ``fresh`` (a new block-0 capture)."""
        entry = self._state["inputs"]
        if entry is None or self.start_block == 0:
            return None
        tensors = self._load_file(INPUTS, entry)
        if len(tensors) != len(fresh):
            raise CheckpointError(f"{self.folder}: saved {len(tensors)} calibration batches, the command has {len(fresh)}")
        return [dataclasses.replace(c, hidden=tensors[f"{k:06d}"]) for k, c in enumerate(fresh)]

    # -- writing ----------------------------------------------------------------------------------------------
    def on_block_done(self, index: int, model: nn.Module, cache: list[Any] | None = None) -> None:
        from safetensors.torch import save as st_save

        self.folder.mkdir(parents=True, exist_ok=True)
        prefix = f"{self.blocks}.{index}"
        tensors, layers, tied = collect_state(model.get_submodule(prefix), prefix=prefix)
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        name = f"block-{index:05d}.safetensors"
        write_bytes_atomic(self.folder / name, data)
        self._state["blocks"][str(index)] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                             "layers": layers, "tied": tied}
        if cache:
            hidden = {f"{k:06d}": c.hidden.detach().cpu().contiguous() for k, c in enumerate(cache)}
            data = st_save(hidden, metadata={"format": "pt"})
            write_bytes_atomic(self.folder / INPUTS, data)
            self._state["inputs"] = {"sha256": hashlib.sha256(data).hexdigest(), "after_block": index}
        self._state["last_done"] = index
        self._state.pop("digest", None)
        self._state["digest"] = mf.digest_of(self._state)
        write_bytes_atomic(self.folder / PROGRESS, mf.canonical_json(self._state).encode())

    def clear(self) -> None:
        """Remove the progress (after the final checkpoint is in place)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.parent.exists():
            fsync_dir(self.folder.parent)


__all__ = ["BlockProgress", "progress_dir_for"]
