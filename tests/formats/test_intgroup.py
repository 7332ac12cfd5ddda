import pytest
import torch

from tensorslim.errors import ConfigError, FormatError, UnsupportedLayerError
from tensorslim.formats import IntGroup, IntGroupWeight, format_from_dict, parse_format, quantize_rtn


def _ref_rtn(w: torch.Tensor, bits: int, g: int, sym: bool) -> torch.Tensor:
    """Float64 reference of the documented grid, one group at a time."""
    out = torch.empty_like(w, dtype=torch.float64)
    maxq = 2**bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            x = w[r, c0 : c0 + g].double()
            if sym:
                a = x.abs().max() or torch.tensor(1.0, dtype=torch.float64)
                s = torch.tensor(float(a) / (maxq / 2)).half().double()
                z = 2 ** (bits - 1)
            else:
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                if lo == hi:
                    lo, hi = -1.0, 1.0
                s = torch.tensor((hi - lo) / maxq).half().double()
                z = float(torch.clamp(torch.round(-lo / s), 0, maxq))
            q = torch.clamp(torch.round(x / s) + z, 0, maxq)
            out[r, c0 : c0 + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_float64_reference(bits, sym):
    torch.manual_seed(bits + 10 * sym)
    w = torch.randn(6, 128) * 0.05
    w[0, :32] = 0  # an all-zero group
    cw = quantize_rtn(w, IntGroup(bits=bits, group_size=32, symmetric=sym))
    ref = _ref_rtn(w, bits, 32, sym)
    assert torch.allclose(cw.decode().double(), ref, atol=1e-6, rtol=0)


def test_nbytes_counts_every_stored_byte_and_bpw():
    f = IntGroup(bits=4, group_size=64)
    cw = quantize_rtn(torch.randn(576, 1536), f)
    assert cw.nbytes == f.nbytes((576, 1536)) == sum(t.numel() * t.element_size() for t in cw.tensors().values())
    assert cw.bits_per_weight == pytest.approx(4 + 16 / 64 + 4 / 64)
    fs = IntGroup(bits=3, group_size=64, symmetric=True)
    assert fs.bits_per_weight((576, 576)) == pytest.approx(3 + 16 / 64)


def test_state_roundtrip_bit_exact():
    f = IntGroup(bits=3, group_size=32)
    cw = quantize_rtn(torch.randn(16, 96), f)
    back = IntGroupWeight.from_tensors(f, cw.shape, {k: v.clone() for k, v in cw.tensors().items()})
    assert torch.equal(back.decode(), cw.decode())


def test_act_order_permutation_decodes_to_original_order():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    perm = torch.randperm(64)
    f = IntGroup(bits=8, group_size=16, act_order=True)
    cw = quantize_rtn(w, f, perm)
    assert torch.allclose(cw.decode(), w, atol=0.02)
    assert cw.nbytes == f.nbytes((8, 64))


def test_rtn_error_shrinks_with_bits():
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    errs = [float((quantize_rtn(w, IntGroup(bits=b, group_size=64)).decode() - w).norm()) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_parse_and_dict_roundtrip():
    for s in ["int4:g64", "int3:g64:sym", "int8:pc", "int2:g32:act", "int4:g128:sym:bfloat16"]:
        f = parse_format(s)
        assert parse_format(f.spec()) == f
        assert format_from_dict(f.to_dict()) == f
    assert parse_format("int4") == IntGroup(bits=4, group_size=128)


@pytest.mark.parametrize("bad", ["int9:g64", "int4:g0x", "float4", "", "int4:gg"])
def test_bad_format_strings(bad):
    with pytest.raises(FormatError):
        parse_format(bad)


def test_bad_configs():
    with pytest.raises(ConfigError):
        IntGroup(bits=0)
    with pytest.raises(ConfigError):
        IntGroup(bits=4, group_size=0)
    with pytest.raises(FormatError):
        format_from_dict({"family": "evil", "x": 1})
    with pytest.raises(FormatError):
        format_from_dict({"family": "int", "bits": 4, "__class__": "x"})


def test_group_not_dividing_names_layer_and_fix():
    with pytest.raises(UnsupportedLayerError, match=r"model.layers.0.mlp.up_proj.*576 is not divisible by group 128; use group 64"):
        IntGroup(bits=4, group_size=128).check((1536, 576), "model.layers.0.mlp.up_proj")


def test_tampered_tensors_rejected():
    f = IntGroup(bits=4, group_size=32)
    cw = quantize_rtn(torch.randn(4, 64), f)
    t = cw.tensors()
    t["scales"] = t["scales"][:, :1]
    with pytest.raises(ConfigError):
        IntGroupWeight.from_tensors(f, cw.shape, t)


def test_weights_built_from_a_parameter_hold_no_autograd_graph():
    """Quantizing ``nn.Linear.weight`` (requires grad) must not keep the graph, and with it fp32 copies of the
    matrix, alive in the stored tensors (every format's weight detaches them on construction)."""
    from tensorslim.formats.fp8 import FP8, quantize_fp8
    from tensorslim.formats.mx import NVFP4, quantize_nvfp4
    from tensorslim.formats.ternary import Ternary, quantize_ternary

    w = torch.nn.Parameter(torch.randn(32, 256))
    for cw in (quantize_rtn(w, IntGroup(bits=4, group_size=128)), quantize_rtn(w * 2, IntGroup(bits=3)),
               quantize_fp8(w, FP8()), quantize_nvfp4(w, NVFP4()), quantize_ternary(w, Ternary(group_size=128))):
        for name, t in cw.tensors().items():
            assert not t.requires_grad and t.grad_fn is None, (type(cw).__name__, name)
