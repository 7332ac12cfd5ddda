"""llama.cpp k-quants Q4_K and Q6_K as tensorslim formats (``q4_k``, ``q6_k``): the stored bytes ARE the GGML blocks.

Each row is cut into super-blocks of 256 inputs (``QK_K``), each stored as one GGML block, exactly as ggml-common.h:
- ``Q4_K`` (144 bytes, 4.5 bits/weight): ``d``, ``dmin`` (fp16), ``scales[12]`` (eight 6-bit sub-block scales ``sc``
  and mins ``m`` for sub-blocks of 32, packed as ``get_scale_min_k4``), ``qs[128]`` (4-bit codes; bytes
  ``32c..32c+31`` hold inputs ``64c + l`` in the low nibble and ``64c + 32 + l`` in the high nibble).
  ``w = (d * sc) * q - (dmin * m)``.
- ``Q6_K`` (210 bytes, 6.5625 bits/weight): ``ql[128]`` (low 4 bits), ``qh[64]`` (high 2 bits), ``scales[16]`` (int8,
  one per 16 inputs), ``d`` (fp16). ``w = (d * sc) * (q - 32)``.
``decode()`` evaluates these products in float32 in the same order as ``gguf.quants.dequantize`` (one rounding per
product / difference), so our weights and gguf's (hence llama.cpp's reference dequantizer and transformers' GGUF
loader) are bit-identical, and GGUF export is a byte copy (:mod:`tensorslim.io.gguf_export`).

Quantizer (RTN-style, after llama.cpp's ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``): per sub-block a
weighted least-squares fit over a small grid of candidate scales (``make_qkx2_quants``: weights ``sqrt(mean x^2) +
|x|``, min clamped to <= 0; Q6_K: symmetric, ``make_qx_quants``-like), then the sub-block scales (and mins) are
quantized to 6 bits against fp16 super-scales (Q6_K: int8 against ``d = max|scale| / 127``), and the codes are
recomputed against the *stored* scales so ``decode`` is what was evaluated. Limits: ``in_features`` must be a
multiple of 256 (SmolLM2's 576-wide rows are not; 1536 is): other shapes are refused by ``supports``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..errors import ConfigError, FormatError, NumericalError
from .base import CompressedWeight, Format, Shape, register_weight_class

QK_K = 256
BLOCK_BYTES = {"q4_k": 144, "q6_k": 210}
GGML_TYPE = {"q4_k": "Q4_K", "q6_k": "Q6_K"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class KQuant(Format):
    family: ClassVar[str] = "kquant"
    kind: str = "q4_k"

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_BYTES:
            raise ConfigError(f"KQuant.kind must be one of {sorted(BLOCK_BYTES)}, got {self.kind!r}")

    def supports(self, shape: Shape) -> str | None:
        if shape[1] % QK_K:
            return (f"{shape[1]} inputs are not a multiple of {QK_K} (the {GGML_TYPE[self.kind]} super-block); "
                    f"use int4:g32:sym (GGUF Q4_0) or int4:g64, or ignore the layer (--ignore)")
        return None

    def nbytes(self, shape: Shape) -> int:
        out, inp = shape
        return out * (inp // QK_K) * BLOCK_BYTES[self.kind]

    def spec(self) -> str:
        return self.kind


def parse_kquant(spec: str) -> KQuant:
    m = re.match(r"^(q4_k|q6_k)$", spec.strip().lower())
    if not m:
        raise FormatError(f"cannot parse k-quant format {spec!r}; expected q4_k or q6_k")
    return KQuant(kind=m.group(1))


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian bytes -> float32 values of the fp16 numbers."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _q4k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 12] packed bytes -> (sc, m), each [..., 8] int64 in 0..63 (gguf's Q4_K.get_scale_min)."""
    s = s.long()
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    return sc, mn


def _q4k_pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    lo, hi = sc[..., :4], sc[..., 4:]
    mlo, mhi = mn[..., :4], mn[..., 4:]
    out = torch.cat([lo | ((hi >> 4) << 6), mlo | ((mhi >> 4) << 6), (hi & 15) | ((mhi & 15) << 4)], -1)
    return out.to(torch.uint8)


def _decode_blocks(kind: str, b: torch.Tensor) -> torch.Tensor:
    """[n, block bytes] uint8 -> [n, 256] float32, the same float32 operations as gguf.quants.dequantize."""
    n = b.shape[0]
    if kind == "q4_k":
        d, dmin = _f16(b[:, 0:2].reshape(n, 1, 2)), _f16(b[:, 2:4].reshape(n, 1, 2))
        sc, mn = _q4k_scale_min(b[:, 4:16])
        dd = (d * sc.float()).unsqueeze(-1)
        dm = (dmin * mn.float()).unsqueeze(-1)
        qs = b[:, 16:].long().reshape(n, 4, 1, 32) >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)
        q = (qs & 15).reshape(n, 8, 32).float()
        return (dd * q - dm).reshape(n, QK_K)
    ql, qh, sc, d = b[:, :128].long(), b[:, 128:192].long(), b[:, 192:208], b[:, 208:210]
    dd = (_f16(d.reshape(n, 1, 2)) * sc.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    lo = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4]).reshape(1, 1, 2, 1)) & 15
    hi = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)) & 3
    q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << 4)) - 32
    return (dd * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class KQuantWeight(CompressedWeight):
    format: KQuant
    blocks: torch.Tensor  # uint8 [out, in/256 * block bytes]: the GGML blocks of each row, in order

    def validate(self) -> None:
        out, inp = self.shape
        want = (out, self.format.nbytes((1, inp)))
        if self.format.supports(self.shape) is not None or self.blocks.dtype != torch.uint8 \
                or tuple(self.blocks.shape) != want:
            raise ConfigError(f"KQuantWeight {self.format.spec()} {self.shape}: blocks should be {want} uint8, "
                              f"got {tuple(self.blocks.shape)} {self.blocks.dtype}")
        super().validate()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        b = self.blocks.cpu().reshape(-1, BLOCK_BYTES[self.format.kind])
        return _decode_blocks(self.format.kind, b).reshape(out, inp).to(device=self.blocks.device, dtype=dtype)


register_weight_class(KQuant, KQuantWeight)


# ------------------------------------------------------------------------------------------------------ quantizer


def _fit_min_scale(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2_quants over rows of ``x`` ``[n, g]``: ``x ~ s * L - mn`` with ``L`` in 0..nmax, ``mn >= 0``.

    Tries ``iscale = (nmax + r) / (max - min)`` for ``r`` in {0, -1, -0.9, ..., 1} with a weighted least-squares
    refit of ``(s, mn)`` for each rounding ``L``; keeps the best weighted error. Returns ``(s, mn)``, each ``[n]``."""
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    rng = (hi - lo).clamp(min=1e-30)
    best_s, best_m = rng / nmax, -lo
    best_err = (w * (best_s[:, None] * torch.round((x - lo[:, None]) / best_s[:, None]).clamp(0, nmax)
                     - best_m[:, None] - x) ** 2).sum(-1)
    sw, swx = w.sum(-1), (w * x).sum(-1)
    for r in [0.0] + [-1.0 + 0.1 * i for i in range(21)]:
        iscale = (nmax + r) / rng
        L = torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
        swl, swl2, swlx = (w * L).sum(-1), (w * L * L).sum(-1), (w * L * x).sum(-1)
        det = sw * swl2 - swl * swl
        ok = det > 0
        s = torch.where(ok, (sw * swlx - swx * swl) / torch.where(ok, det, 1), best_s)
        mn = torch.where(ok, (swl2 * swx - swl * swlx) / torch.where(ok, det, 1), lo)  # the offset (<= 0 wanted)
        pos = mn > 0
        s = torch.where(pos, swlx / swl2.clamp(min=1e-30), s)
        mn = torch.where(pos, torch.zeros_like(mn), mn)
        err = (w * (s[:, None] * L + mn[:, None] - x) ** 2).sum(-1)
        better = ok & (err < best_err) & (s > 0)
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, -mn, best_m)
    return best_s.clamp(min=0), best_m.clamp(min=0)


def _to_f16(x: torch.Tensor, what: str) -> torch.Tensor:
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise NumericalError(f"a k-quant {what} overflows fp16 (max {float(x.abs().max()):.3g}); check the weights")
    return h


def _quantize_q4k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av = (sub * sub).mean(-1, keepdim=True).sqrt()
    s, mn = _fit_min_scale(sub, av + sub.abs(), 15)
    s, mn = s.reshape(n, 8), mn.reshape(n, 8)
    d = _to_f16(s.amax(-1) / 63, "super-block scale")
    dmin = _to_f16(mn.amax(-1) / 63, "super-block min")
    df, dminf = d.float(), dmin.float()
    ls = torch.where(df[:, None] > 0, torch.round(s / df.clamp(min=1e-30)[:, None]), 0).clamp(0, 63).long()
    lm = torch.where(dminf[:, None] > 0, torch.round(mn / dminf.clamp(min=1e-30)[:, None]), 0).clamp(0, 63).long()
    d1 = (df[:, None] * ls.float()).unsqueeze(-1)  # the stored effective scale / min, as decode computes them
    m1 = (dminf[:, None] * lm.float()).unsqueeze(-1)
    xs = x.reshape(n, 8, 32)
    q = torch.where(d1 > 0, torch.round((xs + m1) / d1.clamp(min=1e-30)), 0).clamp(0, 15).long()
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128).to(torch.uint8)
    return torch.cat([d.view(torch.uint8).reshape(n, 2), dmin.view(torch.uint8).reshape(n, 2),
                      _q4k_pack_scale_min(ls, lm), qs], -1)


def _quantize_q6k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    w = sub * sub  # llama.cpp's q6_K reference weights (x^2)
    amax_idx = sub.abs().argmax(-1, keepdim=True)
    vmax = sub.gather(-1, amax_idx).squeeze(-1)  # the signed value of largest magnitude
    best_s = vmax / -32
    best_err = torch.full_like(vmax, float("inf"))
    for r in [0.0] + [0.1 * i for i in range(-9, 10)]:
        iscale = torch.where(vmax != 0, -(32 + r) / torch.where(vmax != 0, vmax, 1), 0)
        L = torch.round(iscale[:, None] * sub).clamp(-32, 31)
        sl, sll = (w * L * sub).sum(-1), (w * L * L).sum(-1)
        s = torch.where(sll > 0, sl / sll.clamp(min=1e-30), 0)
        err = (w * (s[:, None] * L - sub) ** 2).sum(-1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    s = best_s.reshape(n, 16)
    smax_idx = s.abs().argmax(-1, keepdim=True)
    smax = s.gather(-1, smax_idx).squeeze(-1)
    d = _to_f16(smax.abs() / 127, "super-block scale")
    df = d.float()
    ls = torch.where(df[:, None] > 0, torch.round(s / df.clamp(min=1e-30)[:, None]), 0).clamp(-127, 127).long()
    d1 = (df[:, None] * ls.float()).unsqueeze(-1)
    xs = x.reshape(n, 16, 16)
    q = (torch.where(d1 != 0, torch.round(xs / torch.where(d1 != 0, d1, 1)), 0).clamp(-32, 31) + 32).long()
    q = q.reshape(n, 2, 4, 32)  # [block, half, k, l]: input 128*half + 32*k + l
    lo, hi = q & 15, q >> 4
    ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(n, 128)  # low nibble: k 0..1; high nibble: k 2..3
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    scales = ls.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), scales, d.view(torch.uint8).reshape(n, 2)], -1)


def quantize_kquant(w: torch.Tensor, fmt: KQuant) -> KQuantWeight:
    out, inp = w.shape
    fmt.check((out, inp))
    x = w.detach().float().cpu().reshape(-1, QK_K)
    blocks = (_quantize_q4k if fmt.kind == "q4_k" else _quantize_q6k)(x)
    cw = KQuantWeight(format=fmt, shape=(out, inp), blocks=blocks.reshape(out, -1).contiguous().to(w.device))
    cw.validate()
    return cw


from .registry import register_format  # noqa: E402 - registration after the definitions

register_format("q", KQuant, parse_kquant)
