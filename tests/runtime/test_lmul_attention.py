import copy

import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.models.adapter import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.runtime.lmul_attention import apply_lmul_attention, lmul_attention
from tensorslim.runtime.numerics import LMulLinear, apply_numerics, lmul, round_mantissa


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.seed() % 2**31))


def _bound(m: int) -> float:  # per-product relative error of the adder (tested in test_numerics.py)
    return max(2.0 ** -(m if m <= 3 else (3 if m == 4 else 4)), 0.08)


def _qkv(g, b=2, h=4, kv=2, t=6, d=8):
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, kv, t, d, generator=g),
            torch.randn(b, kv, t, d, generator=g))


def _causal(t: int) -> torch.Tensor:
    return torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), 1)[None, None]


@pytest.mark.parametrize("m", [2, 3, 5])
def test_lmul_attention_matches_an_elementwise_reference(m):
    q, k, v = _qkv(_gen())
    scale = 8**-0.5
    out, probs = lmul_attention(torch.nn.Module(), q, k, v, _causal(6), scale, mantissa_bits=m)
    # float64 reference: every product an elementwise L-Mul, GQA by repeating each KV head for its 2 query heads
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = lmul(q.unsqueeze(3), kr.unsqueeze(2), m).double().sum(-1) * scale + _causal(6).double()
    p = torch.softmax(s, -1)
    torch.testing.assert_close(probs.double(), p, rtol=1e-5, atol=1e-6)
    o = lmul(probs.unsqueeze(-1), vr.unsqueeze(2), m).double().sum(-2)  # uses the kernel's P: tests P V alone
    torch.testing.assert_close(out.double(), o.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # error bound of the scores against exact products of the same m-bit operands
    qm, km = round_mantissa(q, m).double(), round_mantissa(kr, m).double()
    exact = qm @ km.transpose(-1, -2) * scale
    scores = lmul(q.unsqueeze(3), kr.unsqueeze(2), m).double().sum(-1) * scale
    assert bool(((scores - exact).abs() <= _bound(m) * (qm.abs() @ km.abs().transpose(-1, -2)) * scale + 1e-9).all())
    assert float((scores - exact).abs().max()) > 1e-3  # it is an approximation: the bound is not vacuous
    # P V: the probabilities sum to 1, so |O_lmul - P V| <= bound * max|v| per output
    pv = probs.double() @ round_mantissa(vr, m).double()
    assert float((out.double().transpose(1, 2) - pv).abs().max()) <= _bound(m) * float(vr.abs().max()) + 1e-6


def test_error_falls_with_the_mantissa_width_then_plateaus_above_zero():
    # L-Mul drops the a*b mantissa term: widening the mantissa removes operand rounding, not this error
    g = _gen()
    q, k, v = _qkv(g, t=32, d=16)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    exact = torch.softmax((q.double() @ kr.double().transpose(-1, -2)) / 4 + _causal(32).double(), -1) @ vr.double()
    err = {}
    for m in (1, 2, 3, 8):
        out, _ = lmul_attention(torch.nn.Module(), q, k, v, _causal(32), 0.25, mantissa_bits=m)
        err[m] = float((out.double().transpose(1, 2) - exact).norm() / exact.norm())
    assert err[1] > err[2] > err[3] and 0.005 < err[8] < 0.1


def test_lmul_numerics_mode_routes_attention_and_linears():
    model = tiny_model("llama", seed=int(torch.seed() % 1000))
    ids = torch.randint(0, 128, (2, 12), generator=_gen())
    with torch.no_grad():
        ref = model(ids).logits.double()
        lm = apply_numerics(copy.deepcopy(model), "lmul:m3", get_adapter(model))
        got = lm(ids).logits.double()
        only_linears = apply_numerics(copy.deepcopy(model), "lmul:m3", get_adapter(model), attention=False)
        lin = only_linears(ids).logits.double()
        only_attn = apply_lmul_attention(copy.deepcopy(model), 3)(ids).logits.double()
    assert lm.config._attn_implementation == "tensorslim_lmul_m3"
    assert only_linears.config._attn_implementation != "tensorslim_lmul_m3"
    assert isinstance(lm.model.layers[0].self_attn.q_proj, LMulLinear)
    # attention emulation changes the result, and both stay close to the exact model
    assert not torch.equal(got, lin) and not torch.equal(only_attn, ref)
    for x in (got, only_attn):
        assert float((x - ref).norm() / ref.norm()) < 0.2
    # cached decoding runs through the same attention (one query row against the cache)
    # (an explicit mask: without one transformers masks prompt tokens equal to the pad id)
    prompt = ids[:1]
    out = lm.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, min_new_tokens=3, do_sample=False
    )
    assert out.shape == (1, 15)


def test_bad_lmul_attention_input():
    q, k, v = _qkv(_gen())
    with pytest.raises(ConfigError):
        lmul_attention(torch.nn.Module(), q, k, v, None, 1.0, mantissa_bits=3, softcap=30.0)
    with pytest.raises(ConfigError):
        apply_lmul_attention(tiny_model("llama"), 0)
