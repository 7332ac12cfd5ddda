"""MXFP4 and NVFP4 through the weights-as-A kernel ("wa", :mod:`tensorslim.kernels.triton.wa_fp4`).

The GPU decodes code pairs with inline PTX the interpreter cannot run, so (1) the PTX strings themselves are executed
here by a small emulator of the five instructions they use, on every code at every position, against the E2M1 table
times the block scale, with the packed multiply done in the target dtype; (2) the kernel's plain-Triton form runs
under the interpreter against ``x @ decode()^T`` in fp32 (poisoned outputs, split-K both ways). The GPU form is
checked at run time by ``dispatch_ext.wa_ext_verified`` and by ``bench/kernels.py --new-formats``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tensorslim.formats import parse_format
from tensorslim.formats.floatcodec import decode_e2m1
from tensorslim.formats.mx import quantize_mx
from tensorslim.kernels import dispatch_ext
from tensorslim.kernels.layout_ext import MX_WA_EXP, fp4_wa_layout, fp4_wa_reason
from tensorslim.kernels.reference import reference_fp32, relative_error

TOL = 1e-3


def _halves(r: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint32 registers -> their two 16-bit halves ``[n, 2]`` as ``dtype`` values (low half first)."""
    h = np.stack([r & 0xFFFF, r >> 16], 1).astype(np.int32)
    return torch.from_numpy(np.where(h >= 1 << 15, h - (1 << 16), h)).to(torch.int16).view(dtype)


def _pack(t: torch.Tensor) -> np.ndarray:
    h = t.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    return (h[:, 0] | (h[:, 1] << 16)).astype(np.uint32)


def run_ptx(src: str, word: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """Execute one of wa_fp4's inline-PTX strings (``$1`` = ``word``, ``$3`` = the multiplier pair, uint32) and
    return ``$0``. Packed multiplies round the exact product to the nearest (``.rn``)."""
    regs = {"$1": word.astype(np.uint32), "$3": mult.astype(np.uint32)}

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        return regs[tok] if tok in regs else np.uint32(int(tok, 0))

    for ins in [i.strip() for i in src.strip("{} ").split(";") if i.strip()]:
        op, args = ins.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        if op == ".reg":
            continue
        if op == "shl.b32":
            regs[a[0]] = (val(a[1]).astype(np.uint64) << int(a[2])).astype(np.uint32)
        elif op == "shr.u32":
            regs[a[0]] = val(a[1]) >> np.uint32(int(a[2]))
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "and.b32":
            regs[a[0]] = val(a[1]) & val(a[2])
        elif op in ("mul.rn.bf16x2", "mul.rn.f16x2"):
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            regs[a[0]] = _pack((_halves(val(a[1]), dt).double() * _halves(val(a[2]), dt).double()).to(dt))
        elif op == "lop3.b32":
            x, y, z, lut = val(a[1]), val(a[2]), val(a[3]), int(a[4], 0)
            out = np.zeros_like(x)
            for i in range(8):  # bit i of the LUT is f(x, y, z) for x = i & 4, y = i & 2, z = i & 1 (0xF0/0xCC/0xAA)
                if lut >> i & 1:
                    mx = x if i & 4 else ~x
                    my = y if i & 2 else ~y
                    mz = z if i & 1 else ~z
                    out |= mx & my & mz
            regs[a[0]] = out
        else:
            raise AssertionError(f"unknown instruction {op!r} in {src!r}")
    return regs["$0"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ptx_decode_is_exact_for_every_code_position_and_exponent(dtype):
    from tensorslim.kernels.triton import wa_fp4

    strings = [getattr(wa_fp4, f"_{'BF16' if dtype == torch.bfloat16 else 'FP16'}_{u}").value for u in range(4)]
    assert all(re.search(r"mul\.rn\.b?f16x2 \$0, m, \$3", s) for s in strings)
    lo_e, hi_e = MX_WA_EXP[dtype]
    codes = np.arange(256)  # every (low, high) pair of codes, the other six nibbles of the word random
    rng = np.random.default_rng(0)
    for u in range(4):
        other = rng.integers(0, 2**32, size=codes.size, dtype=np.uint64).astype(np.uint32)
        mask = np.uint32((0xF << (4 * u)) | (0xF << (4 * u + 16)))
        word = (other & ~mask) | ((codes & 15).astype(np.uint32) << (4 * u)) \
            | ((codes >> 4).astype(np.uint32) << (4 * u + 16))
        expect = decode_e2m1(torch.from_numpy(np.stack([codes & 15, codes >> 4], 1)))
        for e in (lo_e, 127, hi_e, (lo_e + hi_e) // 2):
            m = 2.0 ** (e - 1 if dtype == torch.bfloat16 else e - 113)  # what the kernel builds from e's bits
            bits = (e + 126) << 7 if dtype == torch.bfloat16 else (e - 98) << 10  # the kernel's bit build
            assert float(torch.tensor([bits], dtype=torch.int16).view(dtype)) == m
            pair = run_ptx(strings[u], word, _pack(torch.full((codes.size, 2), m).to(dtype)))
            got = _halves(pair, dtype).double()
            assert torch.equal(got, expect.double() * 2.0 ** (e - 127)), (u, e)
            normal = got[got != 0].abs().min() >= (2.0 ** -126 if dtype == torch.bfloat16 else 2.0 ** -24)
            assert normal


def weight(n: int, k: int, gen, block: int = 32, scale: float = 0.02):
    w = torch.randn(n, k, generator=gen) * scale
    w[1, :block] = 0  # an all-zero block (E8M0 code 0 in the format; the layout gives it a harmless exponent)
    w[::5, 7] *= 40.0  # outliers: the rest of those blocks become small or zero codes
    return quantize_mx(w, parse_format("mxfp4" if block == 32 else f"mxfp4:b{block}"))


def test_layout_exponent_range_and_reasons(gen):
    cw = weight(48, 512, gen)
    wl = fp4_wa_layout(cw)
    assert fp4_wa_reason(cw) is None and wl.j == 32 and wl.q.shape == (48, 64) and wl.sc.shape == (48, 16)
    assert int(cw.scales[1, 0]) == 0 and int(wl.sc[1, 0]) == 127  # the dead block
    assert wl.dtype_ok(torch.bfloat16) and wl.dtype_ok(torch.float16)
    tiny = fp4_wa_layout(weight(48, 512, gen, scale=1e-9))  # exponents near 2^-32: fine for bf16, not fp16
    assert tiny.dtype_ok(torch.bfloat16) and not tiny.dtype_ok(torch.float16)
    big = fp4_wa_layout(weight(48, 512, gen, scale=50.0))  # block scales above 2: neither
    assert not big.dtype_ok(torch.bfloat16) and not big.dtype_ok(torch.float32)
    assert fp4_wa_layout(weight(16, 512, gen, block=64)).j == 64
    assert "256 or 512" in fp4_wa_reason(weight(8, 96, gen))
    nv = parse_format("nvfp4")
    from tensorslim.formats.mx import quantize_nvfp4

    assert fp4_wa_reason(quantize_nvfp4(torch.randn(8, 256, generator=gen), nv)) is None
    assert "256 inputs" in fp4_wa_reason(quantize_nvfp4(torch.randn(8, 128, generator=gen), nv))
    assert "MXFP4 (E2M1) and NVFP4" in fp4_wa_reason(quantize_mx(torch.randn(8, 256, generator=gen),
                                                               parse_format("mxfp8")))
    # candidates follow the exponent range: "wa" for bf16 only on the tiny weight
    tw = weight(48, 512, gen, scale=1e-9)
    lay = dispatch_ext.layout(tw)
    assert dispatch_ext.candidates(tw, lay, 1, torch.bfloat16)[0][0] == "wa"
    assert all(c[0] != "wa" for c in dispatch_ext.candidates(tw, lay, 1, torch.float16))


@pytest.fixture(scope="module")
def ops_ext(ops):
    from tensorslim.kernels import ops_ext as mod

    return mod


@pytest.mark.parametrize("block", [32, 64])
def test_wa_fp4_kernel_matches_reference(ops_ext, gen, block):
    """Plain-Triton form under the interpreter (fp16 activations: its bf16 ``tl.dot`` is unreliable)."""
    from tensorslim.kernels import ops

    n, k = 48, 1024
    cw = weight(n, k, gen, block)
    wl = dispatch_ext.wa_ext(cw)
    for m, config in [(1, (8, 64, 1, 4, 3)), (3, (16, 32, 2, 2, 3)), (16, (16, 64, 3, 4, 2))]:
        config = config[:2] + (min(config[2], k // (8 * wl.j)),) + config[3:]  # 4 blocks (32), 2 (64)
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        ref = reference_fp32(cw, x)
        out = torch.zeros(m, n) if config[2] > 1 else torch.full((m, n), float("nan"))
        ops_ext.launch_fp4_wa(x, wl.q, wl.sc, wl.meta(), wl.post, list(config), out)  # atomic split-K into zeros
        assert relative_error(out, ref) <= TOL, (m, config, gen.seed_)
        y = ops_ext.fp4_wa_mm(x, wl.q, wl.sc, wl.meta(), wl.post, list(config), torch.float16)  # serial split-K, fp16 out
        assert y.dtype == torch.float16 and relative_error(y.float(), ref) <= 4e-3, (m, config, gen.seed_)
        ws, cnt = ops.split_scratch(x.device, m, n, 1)
        assert not ws.any() and not cnt.any()  # the workspace is left zeroed


def test_dispatch_runs_wa_first_and_op_registration(ops_ext, gen):
    cw = weight(40, 512, gen)
    x = torch.randn(2, 3, 512, generator=gen).to(torch.float16)
    bias = torch.randn(40, generator=gen)
    assert dispatch_ext.candidates(cw, dispatch_ext.layout(cw), 8, torch.float16)[0][0] == "wa"
    y = dispatch_ext.ext_linear(cw, x, bias, out_dtype=torch.float32)
    assert y.shape == (2, 3, 40)
    assert relative_error(y, reference_fp32(cw, x, bias)) <= TOL, gen.seed_
    wl = dispatch_ext.wa_ext(cw)
    args = (x[0], wl.q, wl.sc, wl.meta(), wl.post, [8, 64, 1, 4, 3], torch.float16)
    torch.library.opcheck(ops_ext.fp4_wa_mm, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ptx_decode_nvfp4_is_exact_for_every_e4m3_scale(dtype):
    """NVFP4: the same PTX with the multiplier ``s_b 2^118`` (bf16) or ``s_b 2^7`` (fp16), built as ``nv_tile`` builds
    it, gives element x ``s_b`` x ``2^-8`` (``2^-7``) exactly for every code pair and every finite E4M3 scale,
    subnormal scales included."""
    from tensorslim.kernels.triton import wa_fp4

    strings = [getattr(wa_fp4, f"_{'BF16' if dtype == torch.bfloat16 else 'FP16'}_{u}").value for u in range(4)]
    sbits = torch.arange(0, 0x7F, dtype=torch.int32).to(torch.uint8)  # 0 .. 448, NaN (0x7F) left out
    sb = sbits.view(torch.float8_e4m3fn).double()
    # the kernel: elem_fp16(byte, E4M3) * 256 (the E4M3 bits at 7..13 of an fp16, exact), then the multiplier
    h = ((sbits.int() & 0x7F) << 7).to(torch.int16).view(torch.float16).double() * 256.0
    assert torch.equal(h, sb)
    mult = (h * (2.0**118 if dtype == torch.bfloat16 else 128.0)).to(dtype)
    assert torch.equal(mult.double(), sb * (2.0**118 if dtype == torch.bfloat16 else 128.0))  # exact
    codes = np.arange(256)
    expect = decode_e2m1(torch.from_numpy(np.stack([codes & 15, codes >> 4], 1))).double()
    shift = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-7
    for u in range(4):
        word = ((codes & 15).astype(np.uint32) << (4 * u)) | ((codes >> 4).astype(np.uint32) << (4 * u + 16))
        for i in range(0, sb.numel(), 3):
            pair = run_ptx(strings[u], word, _pack(mult[i].expand(codes.size, 2)))
            assert torch.equal(_halves(pair, dtype).double(), expect * sb[i] * shift), (u, i)


def nv_weight(n: int, k: int, gen):
    from tensorslim.formats.mx import quantize_nvfp4

    w = torch.randn(n, k, generator=gen) * 0.02
    w[1, :16] = 0  # an all-zero block
    w[2] *= 1e-5  # a row of blocks far below the tensor's max: E4M3 subnormal scales
    w[3, 5] = 3.0  # the tensor's max (g), one block with a large scale
    cw = quantize_nvfp4(w, parse_format("nvfp4"))
    assert (cw.scales[2].view(torch.uint8) < 8).any()  # subnormal scales present
    return cw


def test_wa_nvfp4_kernel_matches_reference(ops_ext, gen):
    """NVFP4 (two 16-blocks a 32-input code position, E4M3 scales, 1/g at the end), plain-Triton form."""
    from tensorslim.kernels import ops

    n, k = 48, 1024
    cw = nv_weight(n, k, gen)
    wl = dispatch_ext.wa_ext(cw)
    assert wl.nv and wl.j == 32 and wl.group == 16 and wl.sc.shape == (n, k // 16) and wl.dtype_ok(torch.bfloat16)
    assert wl.post == float(1.0 / cw.global_scale[0])
    for m, config in [(1, (8, 64, 1, 4, 3)), (3, (16, 32, 2, 2, 3)), (16, (16, 64, 3, 4, 2))]:
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        ref = reference_fp32(cw, x)
        out = torch.zeros(m, n) if config[2] > 1 else torch.full((m, n), float("nan"))
        ops_ext.launch_fp4_wa(x, wl.q, wl.sc, wl.meta(), wl.post, list(config), out)
        assert relative_error(out, ref) <= TOL, (m, config, gen.seed_)
        assert (out[:, 2].abs() > 0).all()  # the subnormal-scale row is not flushed
        y = ops_ext.fp4_wa_mm(x, wl.q, wl.sc, wl.meta(), wl.post, list(config), torch.float16)
        assert y.dtype == torch.float16 and relative_error(y.float(), ref) <= 4e-3, (m, config, gen.seed_)
        ws, cnt = ops.split_scratch(x.device, m, n, 1)
        assert not ws.any() and not cnt.any()
    assert dispatch_ext.candidates(cw, dispatch_ext.layout(cw), 1, torch.float16)[0][0] == "wa"
    xb = torch.randn(2, k, generator=gen).to(torch.float16)
    y = dispatch_ext.ext_linear(cw, xb, out_dtype=torch.float32)
    assert relative_error(y, reference_fp32(cw, xb)) <= TOL


def test_mxfp4_runs_from_its_repack_alone(ops_ext, gen):
    """MXFP4 whose "wa" runs keeps only that repack as its kernel copy (no gemv/gemm layout: 8.5 bits a weight on a
    GPU instead of 12.75), at few and many rows ("dequant" from the repack there); NVFP4 keeps every path; a weight
    whose "wa" cannot take the dtype (MX exponents below fp16's range) keeps the full layout for it."""
    from tensorslim.formats.mx import quantize_nvfp4

    cw = weight(40, 512, gen)
    for m in (2, 70):
        x = torch.randn(m, 512, generator=gen).to(torch.float16)
        assert dispatch_ext.repack_only(cw, x)
        y = dispatch_ext.ext_linear(cw, x, out_dtype=torch.float32)
        assert relative_error(y, reference_fp32(cw, x)) <= TOL, (m, gen.seed_)
    assert cw not in dispatch_ext._LAYOUTS and cw in dispatch_ext._WAEXT
    assert dispatch_ext.runtime_choice(cw, x)[0] == "wa"  # (the interpreter: first config, no timing)
    nv = quantize_nvfp4(torch.randn(40, 512, generator=gen) * 0.02, parse_format("nvfp4"))
    assert not dispatch_ext.repack_only(nv, x)
    dispatch_ext.ext_linear(nv, x)
    assert nv in dispatch_ext._LAYOUTS
    tiny = quantize_mx(torch.randn(40, 512, generator=gen) * 1e-9, parse_format("mxfp4"))  # exponents below fp16's
    assert not dispatch_ext.repack_only(tiny, x) and dispatch_ext.repack_only(tiny, x.to(torch.bfloat16))
