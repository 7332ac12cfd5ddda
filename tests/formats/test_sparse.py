import pytest
import torch

from tensorslim.errors import ConfigError, FormatError, UnsupportedLayerError
from tensorslim.formats import GroupSparse, IntGroup, Sparse, format_from_dict, parse_format, weight_class
from tensorslim.formats.intgroup import quantize_rtn
from tensorslim.formats.sparse import encode_group_sparse, encode_sparse
from tensorslim.methods.prune import select_mask


def _w(out: int, inp: int, seed: int) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


@pytest.mark.parametrize("spec", ["sparse:0.5", "sparse:0.37", "sparse:2:4", "sparse:4:8", "sparse:2:4+int4:g64",
                                  "sparse:1:4:float32", "groupsparse:0.5+int4:g64", "groupsparse:0.3:g16",
                                  "groupsparse:0.5:g32+int3:g16:sym"])
def test_spec_round_trip(spec: str) -> None:
    f = parse_format(spec)
    assert f.spec() == spec
    assert parse_format(f.spec()) == f
    assert format_from_dict(f.to_dict()) == f


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_pattern_is_exact_and_decodes(n: int, m: int) -> None:
    seed = _seed()
    w = _w(24, 64, seed)
    fmt = Sparse(n=n, m=m, value_dtype="float32")
    keep = select_mask(w.abs(), fmt)
    sw = encode_sparse(fmt, w, keep)
    per_group = sw.dense_mask().reshape(24, 64 // m, m).sum(-1)
    assert bool((per_group == n).all())
    ref = (w.double() * keep.double())
    assert torch.equal(sw.decode().double(), ref)
    assert sw.sparsity() == pytest.approx(1 - n / m, abs=0)
    # kept are the n largest of each group
    g = w.abs().reshape(24, -1, m)
    kept_min = torch.where(keep.reshape(24, -1, m), g, torch.inf).amin(-1)
    dropped_max = torch.where(~keep.reshape(24, -1, m), g, -torch.inf).amax(-1)
    assert bool((kept_min >= dropped_max).all())


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_unstructured_sparsity_equals_target(s: float) -> None:
    seed = _seed()
    out, inp = 13, 40  # odd sizes: floor(s*out*in) is what is removed
    w = _w(out, inp, seed)
    fmt = Sparse(sparsity=s)
    for scope in ("layer", "row"):
        sw = encode_sparse(fmt, w, select_mask(w.abs(), fmt, scope=scope))
        removed = out * inp - int(sw.dense_mask().sum())
        assert removed == int(s * out * inp + 1e-9)
        assert sw.nbytes == fmt.nbytes((out, inp)) == out * 5 + 2 * (out * inp - removed)
        # values are fp16 of the kept weights
        assert torch.allclose(sw.decode().double(), (w * sw.dense_mask()).half().double(), atol=0)


def test_dense_nm_bytes_and_state_round_trip() -> None:
    seed = _seed()
    w = _w(32, 128, seed)
    fmt = parse_format("sparse:2:4")
    sw = encode_sparse(fmt, w, select_mask(w.abs(), fmt))
    assert sw.nbytes == 32 * 128 // 8 + 32 * 64 * 2  # 1-bit mask + fp16 kept values
    again = weight_class(fmt).from_tensors(fmt, sw.shape, sw.tensors())
    assert torch.equal(again.decode(), sw.decode())
    x = torch.randn(5, 128, dtype=torch.float64)
    assert torch.allclose(sw.linear(x), x @ sw.decode(torch.float64).T)


def test_nm_with_inner_int4() -> None:
    seed = _seed()
    w = _w(16, 192, seed)
    fmt = parse_format("sparse:2:4+int4:g64")
    assert fmt.compact_format() == IntGroup(bits=4, group_size=32)
    keep = select_mask(w.abs(), fmt)
    sw = encode_sparse(fmt, w, keep)
    compact = w[keep].reshape(16, 96)
    ref = torch.zeros(16, 192)
    ref[keep] = quantize_rtn(compact, IntGroup(bits=4, group_size=32)).decode().reshape(-1)
    assert torch.equal(sw.decode(), ref)
    # scales cost what dense int4:g64 costs: 3 groups of 64 per row
    assert sw.inner.scales.shape == (16, 3)
    assert sw.nbytes == fmt.nbytes((16, 192)) == 16 * 24 + IntGroup(bits=4, group_size=32).nbytes((16, 96))
    again = weight_class(fmt).from_tensors(fmt, sw.shape, sw.tensors())
    assert torch.equal(again.decode(), sw.decode())
    assert sw.bits_per_weight < 4.25 + 1  # cheaper than a dense fp16 and a dense mask


@pytest.mark.parametrize("spec", ["groupsparse:0.5+int4:g16", "groupsparse:0.3:g8"])
def test_group_sparse_exact_groups_and_round_trip(spec: str) -> None:
    seed = _seed()
    w = _w(10, 64, seed)
    fmt = parse_format(spec)
    assert isinstance(fmt, GroupSparse)
    gm = select_mask(w.abs(), fmt)
    gw = encode_group_sparse(fmt, w, gm)
    total = 10 * 64 // fmt.group_size
    assert int(gw.group_mask().sum()) == total - int(fmt.sparsity * total + 1e-9)
    assert torch.equal(gw.group_mask(), gm)
    dec = gw.decode()
    dropped = ~gm.repeat_interleave(fmt.group_size, 1)
    assert bool((dec[dropped] == 0).all())
    if fmt.inner is None:
        assert torch.equal(dec[~dropped], w[~dropped].half().float())
    assert gw.nbytes == fmt.nbytes(w.shape)
    again = weight_class(fmt).from_tensors(fmt, gw.shape, gw.tensors())
    assert torch.equal(again.decode(), dec)


def test_bad_inputs_are_typed_errors() -> None:
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            Sparse(sparsity=s)
        with pytest.raises(ConfigError):
            GroupSparse(sparsity=s)
    with pytest.raises(ConfigError):
        parse_format("sparse:1.0")
    with pytest.raises(ConfigError):
        Sparse(n=4, m=4)
    with pytest.raises(ConfigError, match="N:M"):
        parse_format("sparse:0.5+int4:g64")
    with pytest.raises(FormatError):
        parse_format("sparse:half")
    with pytest.raises(UnsupportedLayerError, match="not divisible by m=8"):
        Sparse(n=2, m=8).check((4, 36), "model.layers.0.mlp.down_proj")
    with pytest.raises(UnsupportedLayerError):
        parse_format("groupsparse:0.5+int4:g64").check((4, 96))
