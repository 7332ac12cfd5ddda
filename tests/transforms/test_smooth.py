import pytest
import torch

from tensorslim.errors import CalibrationError, ConfigError
from tensorslim.models.adapter import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.transforms.smooth import apply_smoothing, collect_norm_absmax, smoothing_scales


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_smoothing_leaves_the_model_function_unchanged(arch):
    model = tiny_model(arch, seed=7)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    calib = torch.randint(0, 128, (2, 16), generator=g)
    ids = torch.randint(0, 128, (2, 20), generator=g)
    with torch.no_grad():
        ref = model(ids).logits.double()
        amax = collect_norm_absmax(model, adapter, calib)
        assert len(amax) == 2 * 2
        apply_smoothing(model, adapter, amax, alpha=0.5)
        got = model(ids).logits.double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_scales_balance_activation_and_weight_ranges():
    a = torch.tensor([100.0, 1.0, 4.0])
    w = torch.tensor([[1.0, 1.0, 4.0]])
    s = smoothing_scales(a, [w], alpha=0.5)
    assert torch.allclose(s, torch.tensor([10.0, 1.0, 1.0], dtype=torch.float64))
    # after smoothing, activation max / s equals weight max * s at alpha 0.5
    assert torch.allclose(a.double() / s, w.double().abs().amax(0) * s)
    with pytest.raises(ConfigError):
        smoothing_scales(a, [w], alpha=1.5)


def test_missing_statistics_raise():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError):
        apply_smoothing(model, get_adapter(model), {})
