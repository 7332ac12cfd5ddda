import copy

import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.models.adapter import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.runtime.numerics import LayerCastLinear, apply_numerics, lmul, lmul_matmul, round_mantissa


def _ref_lmul(x: float, y: float, m: int) -> float:
    """Scalar reference of the adder: integer add of the (exponent, mantissa) fields, in Python integers."""
    import math

    if x == 0 or y == 0:
        return 0.0
    sign = math.copysign(1.0, x) * math.copysign(1.0, y)
    fx, ex = math.frexp(abs(x))
    fy, ey = math.frexp(abs(y))
    mx = round((2 * fx - 1) * 2**m)  # mantissa fields (operands are m-bit already)
    my = round((2 * fy - 1) * 2**m)
    l = m if m <= 3 else (3 if m == 4 else 4)
    field = ((ex - 1) << m) + mx + ((ey - 1) << m) + my + (1 << (m - l))  # biases cancel: exponent sum
    e, mant = field >> m, field & ((1 << m) - 1)
    return sign * (1 + mant / 2**m) * 2.0**e


@pytest.mark.parametrize("m", [2, 3, 4, 6])
def test_lmul_is_bit_exact_against_the_integer_adder(m):
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    x = round_mantissa(torch.randn(2000, generator=g) * 4, m)
    y = round_mantissa(torch.randn(2000, generator=g) * 4, m)
    x[0] = 0.0
    x[1] = y[1] = 2 - 2.0**-m  # largest mantissas: the carry cases (two carries when m >= 5)
    got = lmul(x, y, m)
    for a, b, c in zip(x.tolist(), y.tolist(), got.tolist()):
        assert c == _ref_lmul(a, b, m)


@pytest.mark.parametrize("m", [3, 4, 8])
def test_lmul_error_bound_and_matmul(m):
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    x = round_mantissa(torch.randn(5000, generator=g), m)
    y = round_mantissa(torch.randn(5000, generator=g), m)
    rel = ((lmul(x, y, m).double() - x.double() * y.double()).abs() / (x.double() * y.double()).abs())
    # analytic bound: 2^-l at a = b = 0 (the added constant), about 7.5% at the carry edge; it does not vanish with m
    bound = max(2.0 ** -(m if m <= 3 else (3 if m == 4 else 4)), 0.08)
    assert float(rel.max()) <= bound and 0.01 < float(rel.mean()) < 0.06
    a = torch.randn(7, 48, generator=g)
    w = torch.randn(11, 48, generator=g)
    ref = lmul(a.unsqueeze(1).expand(7, 11, 48), w.unsqueeze(0).expand(7, 11, 48), m).double().sum(-1)
    assert torch.allclose(lmul_matmul(a, w, m).double(), ref, rtol=1e-5, atol=1e-5)
    exact = a.double() @ w.double().T
    assert float((lmul_matmul(a, w, m).double() - exact).norm() / exact.norm()) < 0.1


def test_round_mantissa_with_wide_mantissa_is_identity():
    x = torch.randn(1000)
    assert torch.equal(round_mantissa(x, 23), x)
    assert float(((round_mantissa(x, 3) - x) / x).abs().max()) <= 2.0**-4


def test_layercast_is_fp32_compute_on_bf16_weights():
    model = tiny_model("llama", seed=4)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    lc = apply_numerics(copy.deepcopy(model), "layercast")
    assert isinstance(lc.model.layers[0].self_attn.q_proj, LayerCastLinear)
    assert lc.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        # reference: the fp32 model with weights rounded to bf16
        ref = copy.deepcopy(model)
        for p in ref.parameters():
            p.data = p.data.to(torch.bfloat16).float()
        assert torch.allclose(lc(ids).logits, ref(ids).logits, atol=1e-5)
        one = lc(ids[:1]).logits
        eight = lc(ids).logits[:1]
        assert torch.equal(one, eight)  # batch-invariant: bit-identical, not just close


def test_invariant_linear_is_exact_and_row_independent():
    from tensorslim.runtime.numerics import INVARIANT_ROWS, invariant_linear

    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    w, b = torch.randn(48, 96, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(3, INVARIANT_ROWS + 5, 96, generator=gen)
    out = invariant_linear(x, w, b)
    ref = (x.double() @ w.double().T + b.double()).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a row's result does not depend on which or how many other rows share the call
    assert torch.equal(invariant_linear(x[1:2, 3:4], w, b), out[1:2, 3:4])
    assert torch.equal(invariant_linear(x[2:, :7], w, b), out[2:, :7])
    assert torch.equal(invariant_linear(x[0, 10], w, b), out[0, 10])


def test_lmul_model_and_bad_modes():
    model = tiny_model("llama", seed=5)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        lm = apply_numerics(copy.deepcopy(model), "lmul:m3", get_adapter(model))
        err = float((lm(ids).logits - ref).norm() / ref.norm())
    assert 0 < err < 0.5
    for bad in ("lmul", "lmul:m0", "fp16x", "layer-cast"):
        with pytest.raises(ConfigError):
            apply_numerics(model, bad)
