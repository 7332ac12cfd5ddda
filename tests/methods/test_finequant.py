import pytest
import torch

from tensorslim.errors import ConfigError, UnsupportedLayerError
from tensorslim.formats import IntGroup, quantize_rtn
from tensorslim.methods import build_method
from tensorslim.methods.finequant import FineQuant, candidate_groups, finequant_quantize
from tensorslim.stats import LayerStats


def test_candidates():
    assert candidate_groups(576, 64) == [None, 64]  # 576 = 9 * 64: no power of two between
    assert candidate_groups(1536, 64) == [None, 512, 256, 128, 64]
    assert candidate_groups(512, None) == [None]
    assert candidate_groups(96, 48) == [None, 48]


def _w(out=16, inp=512):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    return torch.randn(out, inp, generator=gen) * 0.02, gen


def test_smooth_matrix_gets_coarse_groups_outliers_get_fine():
    w, gen = _w()
    cw, errors = finequant_quantize(w, IntGroup(bits=8, group_size=32), max_ratio=4.0)
    assert cw.format.group_size is None  # Gaussian weights: per-channel error is within ~2.5x of g32's
    w2 = w.clone()
    w2[:, 7] *= 200  # an outlier column ruins every grid that contains it
    cw2, errors2 = finequant_quantize(w2, IntGroup(bits=4, group_size=32))
    assert cw2.format.group_size is not None
    chosen = errors2[cw2.format.spec()]
    assert chosen <= 1.25 * errors2["int4:g32"]
    # coarse-to-fine monotone bookkeeping: the chosen one is the first acceptable in candidate order
    for spec, e in errors2.items():
        if spec == cw2.format.spec():
            break
        assert e > 1.25 * errors2["int4:g32"]
    assert torch.equal(cw2.codes, quantize_rtn(w2, cw2.format).codes)


def test_error_non_increasing_as_groups_halve():
    w, _ = _w()
    _, errors = finequant_quantize(w, IntGroup(bits=3, group_size=16))
    vals = list(errors.values())
    assert all(b <= a * 1.02 for a, b in zip(vals, vals[1:]))  # finer grids: (essentially) never worse


def test_method_api():
    w, _ = _w()
    m = build_method("finequant", IntGroup(bits=4, group_size=64), max_ratio=1.0)
    assert isinstance(m, FineQuant)
    cw = m.apply(w, LayerStats(), layer="L")
    assert cw.format.bits == 4
    with pytest.raises(UnsupportedLayerError, match="'L'"):
        m.apply(torch.randn(4, 100), LayerStats(), layer="L")
    with pytest.raises(ConfigError):
        FineQuant(format=IntGroup(bits=4), max_ratio=0.5)
