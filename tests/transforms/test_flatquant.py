import pytest
import torch

from tensorslim.errors import ConfigError, UnsupportedModelError
from tensorslim.models.adapter import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.runtime.actquant import apply_activation_quant
from tensorslim.transforms.flatquant import (FlatMLP, FlatNorm, FlatQuantConfig, apply_flatquant, fit_affine,
                                             kron_apply, kron_factors)


def _seed() -> int:
    return int(torch.seed() % 2**31)


@pytest.mark.parametrize("n, want", [(576, (24, 24)), (1536, (32, 48)), (4096, (64, 64)), (11008, (86, 128)),
                                     (14336, (112, 128)), (16, (4, 4)), (7, (1, 7))])
def test_kron_factors_follow_flatquants_rule(n, want):
    assert kron_factors(n) == want


def test_kron_apply_equals_the_dense_kronecker_product():
    g = torch.Generator().manual_seed(_seed())
    p1, p2 = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, 48, generator=g, dtype=torch.float64)
    assert torch.allclose(kron_apply(x, p1, p2), x @ torch.kron(p1, p2), atol=1e-12)
    # per head: head k of 2 consecutive blocks uses (p1[k], p2[k])
    q1, q2 = torch.randn(3, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    x = torch.randn(7, 3 * 2 * 8, generator=g, dtype=torch.float64)
    dense = torch.block_diag(*[torch.kron(q1[k], q2[k]) for k in range(3) for _ in range(2)])
    assert torch.allclose(kron_apply(x, q1, q2), x @ dense, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flatquant_leaves_the_unquantized_model_unchanged(arch):
    model = tiny_model(arch, seed=_seed() % 1000)
    g = torch.Generator().manual_seed(_seed())
    ids = torch.randint(0, 128, (4, 24), generator=g)
    calib = torch.randint(0, 128, (4, 32), generator=g)
    with torch.no_grad():
        ref = model(ids).logits.double()
    report = apply_flatquant(model, get_adapter(model), calib, FlatQuantConfig(steps=15, tokens=96, seed=_seed()))
    with torch.no_grad():
        got = model(ids).logits.double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    block = model.model.layers[0]
    assert isinstance(block.input_layernorm, FlatNorm) and isinstance(block.mlp, FlatMLP)
    # training never ends above where it started (the start is kept otherwise), and it did move somewhere
    assert all(e <= s for s, e in zip(report["start"], report["end"]))
    assert any(e < s for s, e in zip(report["start"], report["end"]))
    assert len(get_adapter(model).linear_names(model)) == 2 * 7
    with pytest.raises(ConfigError, match="already"):
        apply_flatquant(model, get_adapter(model), calib)


def test_flatquant_is_deterministic_for_a_seed():
    seed = _seed()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))
    states = []
    for _ in range(2):
        model = tiny_model("llama", seed=5)
        apply_flatquant(model, get_adapter(model), calib, FlatQuantConfig(steps=10, tokens=64, seed=seed))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _outlier_layer(seed: int, n: int = 64, out: int = 96, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, torch.randperm(n, generator=g)[:3]] *= 20  # a few outlier channels, as in LLM activations
    w = torch.randn(out, n, generator=g) / n**0.5
    return x, w


@pytest.mark.parametrize("act_bits", [4, 8])
def test_fitted_transform_beats_plain_rtn_and_its_start(act_bits):
    x, w = _outlier_layer(_seed())
    cfg = FlatQuantConfig(act_bits=act_bits, act_clip=1.0, weight_group=32, steps=150, batch_tokens=128, batch_rows=64)
    fit = fit_affine(x, w, cfg, seed=_seed())
    plain = fit_affine(x, w, FlatQuantConfig(act_bits=act_bits, act_clip=1.0, weight_group=32, steps=0))
    # float64 reference of the layer error of the fitted transform under the same fake quantization
    from tensorslim.runtime.actquant import quantize_per_token
    from tensorslim.transforms.flatquant import _fake_weight

    y = x.double() @ w.double().T
    xq = quantize_per_token(fit.inputs(x.double()), f"int{act_bits}")
    yq = xq @ _fake_weight(fit.weights(w), 4, 32).T
    err = float((yq - y).pow(2).sum() / y.pow(2).sum())
    rtn = float((quantize_per_token(x.double(), f"int{act_bits}") @ _fake_weight(w.double(), 4, 32).T - y).pow(2).sum()
                / y.pow(2).sum())
    assert abs(err - fit.loss_end) < 0.05 * fit.loss_end  # the reported loss is the real one (fp32 vs fp64)
    assert fit.loss_end < 0.9 * fit.loss_start and fit.loss_end < 0.5 * rtn
    assert plain.loss_start == plain.loss_end  # no steps: the better start is returned as it is
    # the inverse is exact: W P^-T composed with P gives W back
    assert torch.allclose(fit.inputs(torch.eye(64, dtype=torch.float64)) @ fit.weights(w).T, w.double().T, atol=1e-9)


def test_w4a4_output_error_drops_on_the_tiny_model():
    # end to end on a model with outlier-heavy norm gains: FlatQuant + A4 beats A4 without it
    from tensorslim.formats import CompressedLinear, parse_format
    from tensorslim.methods import build_method
    from tensorslim.stats import LayerStats

    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (4, 32), generator=g)
    calib = torch.randint(0, 128, (8, 32), generator=g)

    def quantized(flat: bool):
        model = tiny_model("llama", seed=7)
        with torch.no_grad():
            for blk in model.model.layers:
                for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                    norm.weight[torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:2]] *= 30
        ref = model(ids).logits.detach().double()
        adapter = get_adapter(model)
        if flat:
            apply_flatquant(model, adapter, calib, FlatQuantConfig(steps=60, tokens=256, weight_group=32, seed=seed))
        method = build_method("rtn", parse_format("int4:g32"))
        for name in adapter.linear_names(model):
            parent, _, child = name.rpartition(".")
            lin = model.get_submodule(name)
            cw = method.apply(lin.weight.detach().float(), LayerStats(), layer=name)
            setattr(model.get_submodule(parent), child, CompressedLinear.from_linear(lin, cw, method="rtn"))
        apply_activation_quant(model, adapter, "int4", clip=0.9)
        with torch.no_grad():
            return float((model(ids).logits.double() - ref).norm() / ref.norm())

    assert quantized(True) < 0.8 * quantized(False)


def test_bad_input_is_refused():
    with pytest.raises(ConfigError):
        FlatQuantConfig(act_bits=1)
    with pytest.raises(ConfigError):
        FlatQuantConfig(act_clip=0.0)
    with pytest.raises(ConfigError):
        FlatQuantConfig(lr=0.0)
    with pytest.raises(ConfigError, match="does not divide"):
        fit_affine(torch.randn(8, 48), torch.randn(4, 48), FlatQuantConfig(weight_group=64))
    bert = tiny_model("bert")
    with pytest.raises(UnsupportedModelError):
        apply_flatquant(bert, get_adapter(bert), torch.randint(0, 100, (2, 8)))


@pytest.mark.slow
def test_flatquant_preserves_smollm2_logits():
    from tensorslim.models.sources import load_model

    model, _ = load_model("smollm2-135m")
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    apply_flatquant(model, get_adapter(model), calib, FlatQuantConfig(steps=3, tokens=64))
    with torch.no_grad():
        got = model(input_ids=ids).logits.double()
    assert float((got - ref).norm() / ref.norm()) < 1e-3
