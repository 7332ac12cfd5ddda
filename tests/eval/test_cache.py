"""CachedBaseline: bit-identical to the wrapped model, computed once per input, safe on disk."""

from __future__ import annotations

import copy

import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.eval import CachedBaseline, evaluate_lm
from tensorslim.models import tiny_model


def _fields(r):
    return (r.perplexity, r.nll_mean, r.kl_mean, r.kl_p99, r.top1_agreement, r.tokens_evaluated)


def _pair(seed: int):
    base = tiny_model("llama", seed=seed)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    tokens = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(seed + 2))
    return base, other, tokens


def _disk_filled(directory, **kw):
    """A fresh pair, the plain (uncached) report, and a directory cache that has been through one evaluation."""
    base, other, tokens = _pair(int(torch.randint(0, 10_000, ())))
    plain = evaluate_lm(other, tokens, baseline=base, window=32)
    cache = CachedBaseline(base, directory=directory, **kw)
    evaluate_lm(other, tokens, baseline=cache, window=32)
    return base, other, tokens, plain, cache


def test_cached_equals_plain_and_runs_base_once() -> None:
    seed = int(torch.randint(0, 10_000, ()))
    base, other, tokens = _pair(seed)
    plain = evaluate_lm(other, tokens, baseline=base, window=16)
    cached = CachedBaseline(base)
    first = evaluate_lm(other, tokens, baseline=cached, window=16)
    assert _fields(first) == _fields(plain)
    assert (cached.misses, cached.hits) == (5, 0)  # 70 tokens -> 4 full windows of 16 + one of 6
    again = evaluate_lm(other, tokens, baseline=cached, window=16)
    assert _fields(again) == _fields(plain)
    assert (cached.misses, cached.hits) == (5, 5)
    # batch 2 stacks two full windows per forward: new inputs, computed once each, then reused
    second = evaluate_lm(other, tokens, baseline=cached, window=16, batch_size=2)
    assert _fields(second)[:5] == pytest.approx(_fields(plain)[:5], rel=1e-5)
    assert cached.misses == 5 + 2
    third = evaluate_lm(other, tokens, baseline=cached, window=16, batch_size=2)
    assert _fields(third) == _fields(second)
    assert cached.misses == 5 + 2


def test_directory_cache_is_reused_and_keyed_by_model(tmp_path) -> None:
    base, other, tokens, plain, _ = _disk_filled(tmp_path)
    b = CachedBaseline(base, directory=tmp_path)  # a fresh process would see the same files
    got = evaluate_lm(other, tokens, baseline=b, window=32)
    assert b.misses == 0 and b.hits == 3
    assert _fields(got) == _fields(plain)
    # a different base model must not reuse these logits
    c = CachedBaseline(other, directory=tmp_path)
    evaluate_lm(base, tokens, baseline=c, window=32)
    assert c.misses == 3
    # a corrupt file is recomputed, not trusted
    for f in tmp_path.glob("logits-*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    d = CachedBaseline(base, directory=tmp_path)
    again = evaluate_lm(other, tokens, baseline=d, window=32)
    assert d.misses == 3 and _fields(again) == _fields(plain)
    assert not list(tmp_path.glob("*.tmp*"))


def test_extra_arguments_refused() -> None:
    cached = CachedBaseline(tiny_model("llama", seed=0))
    with pytest.raises(ConfigError, match="input_ids"):
        cached(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_directory_cache_keeps_no_window_in_memory_unless_asked(tmp_path) -> None:
    base, other, tokens, plain, disk = _disk_filled(tmp_path)
    again = evaluate_lm(other, tokens, baseline=disk, window=32)
    assert not disk._memo  # read back from the files: one window in memory at a time
    assert (disk.misses, disk.hits) == (3, 3) and _fields(again) == _fields(plain)
    both = CachedBaseline(base, directory=tmp_path / "b", memo=True)
    evaluate_lm(other, tokens, baseline=both, window=32)
    assert len(both._memo) == 3 and len(list((tmp_path / "b").glob("logits-*.safetensors"))) == 3
