import dataclasses
from typing import ClassVar

import pytest
import torch

from tensorslim import api
from tensorslim.calib import capture_block_inputs, run_compression
from tensorslim.errors import CalibrationError, UnsupportedLayerError
from tensorslim.formats import CompressedLinear, IntGroup, quantize_rtn
from tensorslim.methods import RTN, Method
from tensorslim.models import get_adapter
from tensorslim.models.tiny import tiny_model
from tensorslim.stats import Stat


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Recording(Method):
    """RTN that also records the statistics it was handed (test only)."""

    name: ClassVar[str] = "recording"
    requires: ClassVar[frozenset] = frozenset({Stat.GRAM, Stat.NORMS})
    seen: dict = dataclasses.field(default_factory=dict, compare=False)

    def apply(self, w, stats, *, layer="<layer>"):
        self.seen[layer] = stats
        return quantize_rtn(w, self.format)


def _data(n=6, seq=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "bert"])
def test_rtn_swaps_every_linear_and_matches_reference(arch):
    model = tiny_model(arch, seed=1)
    adapter = get_adapter(model)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in adapter.linear_names(model)}
    fmt = IntGroup(bits=4, group_size=32)
    res = api.compress(model, RTN(format=fmt), _data(), progress=False)
    assert len(res.layers) == len(originals)
    for name, w in originals.items():
        m = model.get_submodule(name)
        assert isinstance(m, CompressedLinear)
        assert torch.equal(m.compressed.decode(), quantize_rtn(w, fmt).decode())
    assert res.bits_per_weight == pytest.approx(4 + 16 / 32 + 4 / 32)
    assert all(r.relative_error is not None and 0 < r.relative_error < 0.2 for r in res.layers)


def test_statistics_are_from_compressed_previous_blocks():
    """Block 1's Gram must equal X^T X of the inputs produced by the *compressed* block 0."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=2)
    adapter = get_adapter(model)
    data = _data(n=4)
    method = _Recording(format=IntGroup(bits=2, group_size=32))
    run_compression(model, adapter, {n: method for n in adapter.linear_names(model)}, data, batch_size=2, progress=False)
    # recompute block 1's q_proj input on the compressed model
    block1 = adapter.get_blocks(model)[1]
    rows = []
    h = block1.self_attn.q_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=data, use_cache=False)
    h.remove()
    x = torch.cat(rows).double()
    seen = method.seen["model.layers.1.self_attn.q_proj"]
    assert seen.n_tokens == data.numel()
    assert torch.allclose(seen.gram.double(), x.T @ x, rtol=1e-4, atol=1e-4)
    assert torch.allclose(seen.norms.double(), x.square().sum(0), rtol=1e-4, atol=1e-4)
    # q/k/v share one accumulator (same input), o_proj does not
    assert seen is method.seen["model.layers.1.self_attn.k_proj"]
    assert seen is not method.seen["model.layers.1.self_attn.o_proj"]


def test_capture_block_inputs_matches_embeddings():
    model = tiny_model("llama", seed=3)
    data = _data(n=3)
    cache = capture_block_inputs(model, get_adapter(model), data, batch_size=2, device="cpu")
    assert [c.hidden.shape[0] for c in cache] == [2, 1]
    assert torch.equal(torch.cat([c.hidden for c in cache]), model.model.embed_tokens(data))


def test_method_needing_stats_without_data_is_an_error():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    with pytest.raises(CalibrationError, match="calibration"):
        run_compression(model, adapter, {n: _Recording(format=IntGroup(bits=4, group_size=32)) for n in adapter.linear_names(model)}, None, progress=False)


def test_group_size_not_dividing_fails_before_work_and_names_layer():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedLayerError, match=r"model\.layers\.0\..*not divisible by group 48"):
        api.compress(model, RTN(format=IntGroup(bits=4, group_size=48)), _data(), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ignore_keeps_layers_dense_and_counts_them():
    model = tiny_model("llama")
    res = api.compress(model, RTN(format=IntGroup(bits=4, group_size=32)), None, ignore=["*mlp.down_proj"], progress=False)
    assert not isinstance(model.model.layers[0].mlp.down_proj, CompressedLinear)
    assert all("down_proj" not in r.name for r in res.layers)
    assert 4.6 < res.bits_per_weight < 32  # dense fp32 layers counted at 32 bits


def test_nonfinite_weight_names_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UnsupportedLayerError, match=r"model\.layers\.1\.mlp\.up_proj"):
        api.compress(model, RTN(format=IntGroup(bits=4, group_size=32)), None, progress=False)


def test_bf16_calibration_close_to_fp32():
    data = _data(n=4)
    outs = {}
    for dt in ("float32", "bfloat16"):
        model = tiny_model("llama", seed=5)
        adapter = get_adapter(model)
        method = _Recording(format=IntGroup(bits=4, group_size=32))
        run_compression(model, adapter, {n: method for n in adapter.linear_names(model)}, data, progress=False, calib_dtype=dt)
        outs[dt] = method.seen["model.layers.1.mlp.down_proj"].gram.double()
    rel = (outs["bfloat16"] - outs["float32"]).norm() / outs["float32"].norm()
    assert 0 < rel < 0.05


@pytest.mark.parametrize("method,spec", [("mfac", "sparse:0.5"), ("welore", "lowrank:0.3"), ("fwsvd", "lowrank:r8")])
def test_whole_model_preparation_through_compress(method, spec):
    """Methods that need the whole model first (gradients, global rank allocation) work through api.compress."""
    from tensorslim.formats import parse_format
    from tensorslim.methods import build_method

    model = tiny_model("llama", seed=7)
    res = api.compress(model, build_method(method, parse_format(spec)), _data(n=4), progress=False)
    assert res.layers and all(r.relative_error is not None and r.relative_error < 1.0 for r in res.layers)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_data(n=1)).logits).all()
