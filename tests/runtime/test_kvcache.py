import copy

import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.models.adapter import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.runtime.actquant import QuantIO
from tensorslim.runtime.kvcache import KVQuant, apply_kv_quant, bfp_quantize, ksort_permutation, quantize_groups_asym


def test_bfp_matches_float64_reference():
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(6, 64) * torch.rand(6, 1) * 5
    got = bfp_quantize(x, 4, 16).double()
    xb = x.double().reshape(6, 4, 16)
    import math

    for r in range(6):
        for b in range(4):
            step = 2.0 ** math.ceil(math.log2(float(xb[r, b].abs().max()) / 7))
            ref = torch.clamp(torch.round(xb[r, b] / step), -7, 7) * step
            assert torch.allclose(got[r, b * 16:(b + 1) * 16], ref, rtol=0, atol=1e-12)


def test_int_groups_and_ksort_permutation():
    x = torch.randn(3, 32)
    q = quantize_groups_asym(x, 8, 16)
    assert (q - x).abs().max() < (x.amax() - x.amin()) / 255
    w = torch.randn(32, 8)
    w[[1, 20]] *= 10
    p = ksort_permutation(w, heads=2)
    assert sorted(p.tolist()) == list(range(32))
    assert set(p[:16].tolist()) == set(range(16)) and p[0] == 1 and p[16] == 20


def test_ksort_helps_bfp_on_outlier_channels():
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    w = torch.randn(64, 32, generator=g)
    w[[2, 9, 30, 41, 50, 60]] *= 8  # outlier channels of K, spread over the blocks
    k = torch.randn(200, 32, generator=g) @ w.T
    plain = KVQuant(kind="bfp4", head_dim=64)(k)
    sort = KVQuant(kind="bfp4", head_dim=64, perm=ksort_permutation(w, 1))(k)
    assert float(((sort - k) ** 2).sum()) < float(((plain - k) ** 2).sum())


def test_apply_kv_quant_on_a_model():
    model = tiny_model("llama", seed=2)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        ref = model(ids).logits
        for kind in ("int8", "int4", "bfp4"):
            m = apply_kv_quant(copy.deepcopy(model), get_adapter(model), kind)
            assert isinstance(m.model.layers[0].self_attn.k_proj, QuantIO)
            err = float((m(ids).logits - ref).norm() / ref.norm())
            assert 0 < err < (0.02 if kind == "int8" else 0.3)
    with pytest.raises(ConfigError):
        apply_kv_quant(model, get_adapter(model), "int3")
    with pytest.raises(ConfigError):
        KVQuant(kind="bfp4", head_dim=24)
