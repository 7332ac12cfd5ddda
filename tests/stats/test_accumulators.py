import pytest
import torch

from tensorslim.errors import CalibrationError
from tensorslim.stats import AbsMaxAccumulator, GramAccumulator, NormAccumulator


@pytest.mark.parametrize("cls", [GramAccumulator, NormAccumulator, AbsMaxAccumulator])
def test_streamed_equals_batched_and_merge_equals_whole(cls):
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 33, 24, generator=g, dtype=torch.float64)
    rows = x.reshape(-1, 24)
    ref = {GramAccumulator: rows.T @ rows, NormAccumulator: rows.square().sum(0), AbsMaxAccumulator: rows.abs().amax(0)}[cls]
    streamed = cls(24, dtype=torch.float64)
    for chunk in x.split(2):
        streamed.update(chunk)
    assert streamed.count == 7 * 33
    assert torch.allclose(streamed.finalize(), ref, rtol=1e-12, atol=1e-12), seed
    a, b = cls(24, dtype=torch.float64), cls(24, dtype=torch.float64)
    a.update(x[:3])
    b.update(x[3:])
    m = a.merge(b)
    assert m.count == streamed.count
    assert torch.allclose(m.finalize(), streamed.finalize(), rtol=1e-12, atol=1e-12)


def test_fp32_gram_close_to_float64():
    x = torch.randn(4096, 64)
    acc = GramAccumulator(64)
    acc.update(x)
    ref = x.double().T @ x.double()
    assert torch.allclose(acc.finalize().double(), ref, rtol=1e-4, atol=1e-2)


def test_nonfinite_activations_name_the_layer():
    acc = GramAccumulator(4)
    with pytest.raises(CalibrationError, match="blk.q_proj"):
        acc.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), "blk.q_proj")
    with pytest.raises(CalibrationError):
        acc.update(torch.zeros(2, 5), "x")


def test_merge_mismatch_rejected():
    with pytest.raises(CalibrationError):
        GramAccumulator(4).merge(GramAccumulator(5))


def test_bf16_gram_is_close_and_merges():
    x = torch.randn(2048, 48)
    fast = GramAccumulator(48, matmul_dtype=torch.bfloat16)
    for c in x.split(512):
        fast.update(c)
    ref = (x.double().T @ x.double())
    rel = (fast.finalize().double() - ref).norm() / ref.norm()
    assert rel < 5e-3
    assert fast.finalize().dtype == torch.float32
    with pytest.raises(CalibrationError):
        fast.update(torch.full((1, 48), float("inf")), "layer")
