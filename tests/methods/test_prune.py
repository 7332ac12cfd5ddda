import pytest
import torch

from tensorslim.errors import CalibrationError, ConfigError, UnsupportedLayerError
from tensorslim.formats import IntGroup, parse_format
from tensorslim.methods import build_method
from tensorslim.methods.prune import Magnitude, Wanda, balanced_row_counts
from tensorslim.stats import LayerStats


def _case(seed: int, out: int = 24, inp: int = 64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    scale = torch.exp(2 * torch.randn(inp, generator=g))  # channels of very different energy
    x = torch.randn(512, inp, generator=g) * scale
    gram = (x.double().T @ x.double()).float()
    return w, x, LayerStats(n_tokens=512, gram=gram, norms=gram.diagonal().clone())


def _err(w, w_hat, x) -> float:
    return float(((x.double() @ (w - w_hat).double().T) ** 2).sum())


def test_balanced_row_counts() -> None:
    c = balanced_row_counts(5, 13)
    assert c.tolist() == [3, 3, 3, 2, 2] and int(c.sum()) == 13


def test_magnitude_layer_scope_keeps_largest() -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    w, _, stats = _case(seed)
    cw = Magnitude(format=parse_format("sparse:0.5")).apply(w, stats)
    kept = cw.dense_mask()
    assert w.abs()[kept].min() >= w.abs()[~kept].max()
    assert int((~kept).sum()) == w.numel() // 2


@pytest.mark.parametrize("spec", ["sparse:0.5", "sparse:2:4", "sparse:2:4+int4:g32", "groupsparse:0.5:g8"])
def test_wanda_beats_magnitude_on_skewed_inputs(spec: str) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    w, x, stats = _case(seed)
    fmt = parse_format(spec)
    e_mag = _err(w, Magnitude(format=fmt).apply(w, stats).decode(), x)
    e_wanda = _err(w, Wanda(format=fmt).apply(w, stats).decode(), x)
    assert e_wanda < e_mag


def test_wanda_row_scope_is_per_row_exact() -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    w, x, stats = _case(seed, out=7, inp=40)
    cw = Wanda(format=parse_format("sparse:0.3")).apply(w, stats)
    mask = cw.dense_mask()
    assert int((~mask).sum()) == int(0.3 * 7 * 40)
    assert (~mask).sum(1).max() - (~mask).sum(1).min() <= 1
    score = w.abs() * stats.norms.sqrt()
    for r in range(7):
        assert score[r][mask[r]].min() >= score[r][~mask[r]].max()


def test_registry_and_errors() -> None:
    fmt = parse_format("sparse:2:4")
    assert isinstance(build_method("wanda", fmt), Wanda)
    assert isinstance(build_method("magnitude", fmt), Magnitude)
    with pytest.raises(ConfigError):
        build_method("wanda", IntGroup(bits=4, group_size=64))
    with pytest.raises(ConfigError):
        Magnitude(format=fmt, scope="global")
    with pytest.raises(CalibrationError):
        Wanda(format=fmt).apply(torch.randn(4, 8), LayerStats())
    with pytest.raises(UnsupportedLayerError):
        Magnitude(format=parse_format("sparse:2:8")).apply(torch.randn(4, 12), LayerStats())
