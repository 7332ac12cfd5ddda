"""A baseline whose logits are computed once and reused: the base model's side of every KL / top-1 comparison.

Comparing N compressed variants against one base model on the standard protocol runs the base model N times over the
same 32,768 tokens. ``CachedBaseline(base)`` is a drop-in ``baseline=`` for :func:`tensorslim.eval.evaluate_lm` /
``tensorslim.api.evaluate``: the first call with a given batch of token ids runs the wrapped model and keeps its
logits (float32, on the CPU); later calls with the same ids return the kept tensor. Results are bit-identical to
passing the model itself (the same forward produced the logits; nothing is rounded).

Memory: 2,048 x 49,152 float32 logits are 403 MB per window, 6.4 GB for the 16 windows of the standard protocol.
With ``directory=`` the logits are written there instead (one safetensors file per window, atomically) and read back
when asked for again, in this process or a later one, so only the window in use is in memory (``memo=True`` keeps
them in memory as well). The file name hashes the token ids *and* a fingerprint of every parameter of the base
model, so a different or modified base model never reuses another model's logits. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError

__all__ = ["CachedBaseline", "model_fingerprint"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every parameter and buffer (a few seconds for 135M)."""
    h = hashlib.sha256()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CachedBaseline(torch.nn.Module):
    """Wrap a base model so that its logits for each distinct input are computed once (see the module doc)."""

    def __init__(self, model: torch.nn.Module, *, directory: str | os.PathLike[str] | None = None,
                 memo: bool | None = None) -> None:
        """``memo``: keep every window's logits in memory too; by default only without a ``directory``."""
        super().__init__()
        self.model = model
        self._memo: dict[str, torch.Tensor] = {}
        self._keep = directory is None if memo is None else memo
        self._dir = Path(directory) if directory is not None else None
        self._fingerprint = model_fingerprint(model) if self._dir is not None else ""
        self.hits = 0
        self.misses = 0

    def _key(self, ids: torch.Tensor) -> str:
        h = hashlib.sha256(self._fingerprint.encode())
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def _load(self, key: str) -> torch.Tensor | None:
        if self._dir is None:
            return None
        path = self._dir / f"logits-{key[:32]}.safetensors"
        if not path.exists():
            return None
        try:
            got = load_file(str(path))
        except Exception:  # a corrupt cache file is recomputed, never trusted
            return None
        if got.get("key") is None or bytes(got["key"].tolist()).decode(errors="replace") != key:
            return None
        return got["logits"]

    def _store(self, key: str, logits: torch.Tensor) -> None:
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"logits-{key[:32]}.safetensors"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"logits": logits, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(tmp))
        os.replace(tmp, path)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **kwargs) -> SimpleNamespace:
        if kwargs:
            raise ConfigError(f"CachedBaseline only caches plain forwards of input_ids; got extra {sorted(kwargs)}")
        key = self._key(input_ids)
        logits = self._memo.get(key)
        if logits is None:
            logits = self._load(key)
            if logits is None:
                self.misses += 1
                out = self.model(input_ids=input_ids, use_cache=False)
                logits = (out.logits if hasattr(out, "logits") else out[0]).detach().float().cpu()
                self._store(key, logits)
            else:
                self.hits += 1
            if self._keep:
                self._memo[key] = logits
        else:
            self.hits += 1
        return SimpleNamespace(logits=logits.to(input_ids.device))
