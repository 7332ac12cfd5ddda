import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.models.adapter import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.runtime.actquant import ActQuant, QuantIO, apply_activation_quant, quantize_per_token
from tensorslim.transforms.hadamard import apply_rotation


def test_per_token_int_matches_float64_reference():
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(5, 7, 64) * torch.rand(5, 7, 1) * 10
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        s = x.double().abs().amax(-1, keepdim=True) / qmax
        ref = torch.clamp(torch.round(x.double() / s), -qmax, qmax) * s
        got = quantize_per_token(x, f"int{bits}")
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
        assert int((got.double() / s).round().unique().numel()) <= 2 * qmax + 1
    f = quantize_per_token(x, "fp8").double()
    s8 = x.double().abs().amax(-1, keepdim=True) / 448
    # e4m3: relative error <= 2^-4 for normals; below 2^-6 (subnormals) the step is 2^-9, so abs error <= 2^-10 s
    bound = x.double().abs() * 2**-4 + s8 * 2**-10
    assert bool(((f - x.double()).abs() <= bound * (1 + 1e-6)).all())


def test_bad_kinds_raise():
    for bad in ("int1", "int9", "fp4", "bf16"):
        with pytest.raises(ConfigError):
            ActQuant(kind=bad)


def _kl(model_ref, model, ids):
    with torch.no_grad():
        p = torch.log_softmax(model_ref(ids).logits.double(), -1)
        q = torch.log_softmax(model(ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_rotation_helps_4bit_activations_with_outliers():
    base = tiny_model("llama", seed=1)
    with torch.no_grad():  # plant outlier channels in the residual stream (as real LLMs have)
        base.model.embed_tokens.weight[:, [3, 17]] *= 30
        for layer in base.model.layers:
            layer.mlp.down_proj.weight[:, 5] *= 20  # and an outlier channel of the MLP's inner stream
    seed = int(torch.seed() % 2**31)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(seed))  # enough tokens to average
    import copy

    plain = apply_activation_quant(copy.deepcopy(base), get_adapter(base), "int4")
    rot = copy.deepcopy(base)
    apply_rotation(rot, get_adapter(rot), "hadamard", seed=0)
    with torch.no_grad():
        assert torch.allclose(rot(ids).logits, base(ids).logits, atol=1e-3, rtol=1e-4)
    apply_activation_quant(rot, get_adapter(rot), 4)
    assert isinstance(rot.model.layers[0].mlp.down_proj, QuantIO)
    kl_rot, kl_plain = _kl(base, rot, ids), _kl(base, plain, ids)
    assert kl_rot < 0.7 * kl_plain, (seed, kl_rot, kl_plain)
    # int8 is close to lossless
    a8 = apply_activation_quant(copy.deepcopy(base), get_adapter(base), "int8")
    assert _kl(base, a8, ids) < 0.1 * _kl(base, plain, ids)
