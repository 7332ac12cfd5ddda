import dataclasses

import pytest
import torch

from tensorslim.errors import ConfigError
from tensorslim.formats import parse_format
from tensorslim.formats.intgroup import IntGroup
from tensorslim.methods import build_method
from tensorslim.methods.obs import layer_objective
from tensorslim.methods.prune import Wanda
from tensorslim.methods.sparsegpt import SparseGPT, sparsegpt_prune
from tensorslim.stats import LayerStats


def _case(seed: int, out: int = 32, inp: int = 128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(1024, inp, generator=g) @ torch.randn(inp, inp, generator=g) * 0.2 + torch.randn(1024, inp, generator=g)
    gram = (x.double().T @ x.double()).float()
    return w, LayerStats(n_tokens=1024, gram=gram, norms=gram.diagonal().clone())


@pytest.mark.parametrize("spec", ["sparse:0.5", "sparse:0.7", "sparse:2:4", "sparse:4:8", "groupsparse:0.5:g16"])
def test_sparsegpt_beats_wanda_and_keeps_exact_pattern(spec: str) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    w, stats = _case(seed)
    fmt = parse_format(spec)
    h = stats.gram.double()
    cw = SparseGPT(format=fmt, block_size=32).apply(w, stats)
    cw.validate()  # N:M pattern / exact count checks
    e_sgpt = layer_objective(w, cw.decode(), h)
    e_wanda = layer_objective(w, Wanda(format=fmt).apply(w, stats).decode(), h)
    assert e_sgpt < e_wanda
    dec = cw.decode()
    if hasattr(cw, "dense_mask"):
        mask = cw.dense_mask()
        assert bool((dec[~mask] == 0).all())
        assert abs((1 - int(mask.sum()) / mask.numel()) - fmt.target_sparsity) < 1 / mask.numel() + 1e-12


def test_sparsegpt_diagonal_hessian_is_its_saliency_mask() -> None:
    """With H diagonal no error moves: SparseGPT = prune by w^2 * H_jj with the survivors unchanged."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 32, generator=g)
    d = torch.rand(32, generator=g) + 0.5
    fmt = parse_format("sparse:2:4:float32")
    cw = sparsegpt_prune(w, torch.diag(d), fmt, damp=0.0)
    wanda = Wanda(format=fmt).apply(w, LayerStats(n_tokens=1, norms=d))  # |w| sqrt(d) ranks like w^2 d
    assert torch.equal(cw.dense_mask(), wanda.dense_mask())
    assert torch.allclose(cw.decode(), w * cw.dense_mask(), atol=1e-6)


@pytest.mark.parametrize("spec", ["sparse:2:4+int4:g32", "groupsparse:0.5+int4:g16", "groupsparse:0.25:g32+int3:g16"])
def test_joint_quantization_is_on_grid_and_beats_prune_then_rtn(spec: str) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    w, stats = _case(seed)
    fmt = parse_format(spec)
    cw = SparseGPT(format=fmt).apply(w, stats)
    assert cw.nbytes == fmt.nbytes(w.shape)
    h = stats.gram.double()
    e_joint = layer_objective(w, cw.decode(), h)
    e_wanda_rtn = layer_objective(w, Wanda(format=fmt).apply(w, stats).decode(), h)
    assert e_joint < e_wanda_rtn
    # joint with quantization costs a little over pruning alone, never less
    dense_fmt = dataclasses.replace(fmt, inner=None)
    e_prune = layer_objective(w, SparseGPT(format=dense_fmt).apply(w, stats).decode(), h)
    assert e_prune < e_joint


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        build_method("sparsegpt", IntGroup(bits=4, group_size=64))
    with pytest.raises(ConfigError):
        SparseGPT(format=parse_format("sparse:0.5"), damp=-1)
