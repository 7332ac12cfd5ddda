"""Batch invariance helpers: exact against the unchunked computation, and a row's result independent of its batch."""

import copy

import torch

from tensorslim.runtime.invariant import (ATTENTION_NAME, INVARIANT_ROWS, invariant_attention, invariant_rows,
                                          make_batch_invariant)
from tensorslim.runtime.numerics import apply_numerics
from tensorslim.models.tiny import tiny_model


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))


def test_invariant_rows_equals_the_norm_and_is_row_independent():
    g = _gen()
    norm = torch.nn.LayerNorm(40)
    norm.weight.data.normal_(generator=g)
    x = torch.randn(2, INVARIANT_ROWS + 9, 40, generator=g)
    out = invariant_rows(norm, x)
    torch.testing.assert_close(out, norm(x), rtol=0, atol=1e-6)
    assert torch.equal(invariant_rows(norm, x[1:, 5:6]), out[1:, 5:6])
    assert torch.equal(invariant_rows(norm, x[0, 3]), out[0, 3])


def test_invariant_attention_matches_sdpa_per_sequence():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = _gen()
    mod = torch.nn.Module()
    mod.is_causal, mod.num_key_value_groups = True, 1
    q, k, v = (torch.randn(3, 4, 7, 16, generator=g) for _ in range(3))
    out, _ = invariant_attention(mod, q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(mod, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    one, _ = invariant_attention(mod, q[1:2], k[1:2], v[1:2], None, scaling=0.25)
    assert torch.equal(one, out[1:2])


def test_make_batch_invariant_keeps_logits_and_state_dict():
    model = tiny_model("llama", seed=7)
    ids = torch.randint(0, 128, (4, 12), generator=_gen())
    with torch.no_grad():
        ref = model(ids).logits
        inv = make_batch_invariant(copy.deepcopy(model))
        assert inv.config._attn_implementation == ATTENTION_NAME
        assert set(inv.state_dict()) == set(model.state_dict())
        torch.testing.assert_close(inv(ids).logits, ref, rtol=1e-5, atol=1e-5)
        again = copy.deepcopy(inv)  # the chunked forward follows the copy, not the original module
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_layercast_decode_step_is_batch_invariant():
    """One token per sequence on top of a KV cache (1 row vs 4 rows per call): bit-identical logits."""
    model = apply_numerics(tiny_model("llama", seed=8), "layercast")
    ids = torch.randint(0, 128, (4, 10), generator=_gen())
    with torch.no_grad():
        c1 = model(ids[:1, :-1], use_cache=True).past_key_values
        one = model(ids[:1, -1:], past_key_values=c1, use_cache=True).logits
        c4 = model(ids[:, :-1], use_cache=True).past_key_values
        four = model(ids[:, -1:], past_key_values=c4, use_cache=True).logits[:1]
    assert torch.equal(one, four)
