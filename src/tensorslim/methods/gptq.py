"""GPTQ: the OBS column loop (:mod:`.obs`) with projection onto an ``IntGroup`` grid.

Paper: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(arXiv 2210.17323); reference IST-DASLab/gptq. Minimizes ``tr((W - Q) H (W - Q)^T)`` column by column, spreading
each column's rounding error over the columns not yet quantized (see :mod:`.obs` for the loop, damping and dead
inputs).

Group grids (scale/zero per ``group_size`` inputs of a row):
- dynamic (default): a group's min-max grid is fitted when the loop reaches its first column, from the *current*
  (error-updated) values of the group's columns. The reference fits from the matrix as of the block start; fitting
  from the updated values is what is then quantized and is equal or better in our tests (documented deviation).
- static (``static_groups=True``, or ``act_order=True`` with a format without ``:act``): every grid is fitted up
  front from ``W`` in its natural column order; the loop may then visit columns in any order and no permutation is
  stored ("act-order + static groups", the usual deployment choice).
- format ``int4:g64:act``: the loop runs in act-order and groups are consecutive in that order; the permutation is
  stored with the weight (``IntGroupWeight.perm``).
Per-channel (``:pc``) grids are fitted from ``W`` at the start (as the reference does). ``grid="imatrix"``: static
grids clipped to minimize the ``diag(H)``-weighted error (:func:`.rtn_imatrix.weighted_grid`) instead of min-max.

Stored: an ``IntGroupWeight``; ``decode()`` equals the loop's projected matrix exactly. Safeguard: GPTQ is greedy,
so the result is compared with RTN on the same grid layout and Hessian and the better one is returned.
Limits: float32 solve; ``block_size`` is rounded to a multiple of the group size so groups never straddle blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..formats.base import CompressedWeight, check_weight
from ..formats.intgroup import IntGroup, IntGroupWeight, fit_scale_zero, quantize_rtn
from ..stats import LayerStats, Stat
from .base import Method
from .obs import act_order as act_order_perm
from .obs import layer_objective, obs_solve

log = logging.getLogger(__name__)


class GroupProjector:
    """Projection of one column onto its group's integer grid; records codes and grids (solve order).

    ``static``: ``(scale, zero)`` of shape ``[out, n_groups]`` indexed by *original* group (needs ``order`` to map
    solve positions back), or ``None`` for grids fitted on the fly from the block at each group's first column.
    ``keep``: optional bool ``[in, out]`` (solve order, one row per column): entries left unquantized (zero error;
    the outlier variant stores them in a sparse side matrix, as SpQR does). Their codes are still recorded.
    """

    def __init__(self, fmt: IntGroup, out: int, inp: int, *, order: torch.Tensor | None,
                 static: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
                 keep: torch.Tensor | None = None) -> None:
        self.keep = keep
        self.fmt, self.g = fmt, fmt.group(inp)
        self.order = None if order is None else order.tolist()
        self.order_t = None if order is None else order.to(device=device, dtype=torch.long)
        self.static = static
        ng = inp // self.g
        self.codes_t = torch.empty(inp, out, dtype=torch.float32, device=device)  # row j = column j (contiguous)
        self.scale = torch.empty(out, ng, dtype=torch.float32, device=device) if static is None else static[0]
        self.zero = torch.empty(out, ng, dtype=torch.float32, device=device) if static is None else static[1]
        self._s = self._z = None

    def __call__(self, block: torch.Tensor, i: int, start: int, hinv_diag: torch.Tensor) -> torch.Tensor:
        j = start + i
        if self.static is not None:
            grp = (j if self.order is None else self.order[j]) // self.g
            s, z = self.scale[:, grp], self.zero[:, grp]
        else:
            if j % self.g == 0:
                s, z = fit_scale_zero(block[:, i:i + self.g], self.fmt)
                self.scale[:, j // self.g] = s
                self.zero[:, j // self.g] = z
                self._s, self._z = s, z
            s, z = self._s, self._z
        c = torch.clamp(torch.round(block[:, i] / s) + z, 0, self.fmt.maxq)
        self.codes_t[j] = c
        if self.keep is not None:
            return torch.where(self.keep[j], block[:, i], (c - z) * s)
        return (c - z) * s

    def block(self, b: torch.Tensor, u1: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A whole block ``b [k, out]`` (solve order, one row per column; updated in place) in the fused kernel.

        Returns ``(q, err)`` as the OBS loop would produce them, or ``None`` (kept outliers: use the loop).
        """
        if self.keep is not None:
            return None
        from ..kernels.triton.gptq_block import gptq_columns

        k = b.shape[0]
        q, codes, err = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
        if self.static is not None:
            cols = torch.arange(start, start + k, device=b.device)
            grp = (cols if self.order_t is None else self.order_t[cols]) // self.g
            sc, ze = self.scale[:, grp].T.contiguous(), self.zero[:, grp].T.contiguous()
            gptq_columns(b, u1, sc, ze, q, codes, err, 0, k, self.fmt.maxq)
        else:  # dynamic grids: fit each group from the block as updated so far, then run its columns
            sc, ze = torch.empty_like(b), torch.empty_like(b)
            for i0 in range(0, k, self.g):
                s, z = fit_scale_zero(b[i0:i0 + self.g].T, self.fmt)
                self.scale[:, (start + i0) // self.g] = s
                self.zero[:, (start + i0) // self.g] = z
                sc[i0:i0 + self.g] = s
                ze[i0:i0 + self.g] = z
                gptq_columns(b, u1, sc, ze, q, codes, err, i0, min(i0 + self.g, k), self.fmt.maxq)
        self.codes_t[start:start + k] = codes
        return q, err

    @property
    def codes(self) -> torch.Tensor:
        """Integer-valued codes ``[out, in]`` in solve order."""
        return self.codes_t.T


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(Method):
    """``GPTQ(format=IntGroup(bits=4, group_size=64), damp=0.01, block_size=128, act_order=True)``.

    ``act_order=True`` (default, like llm-compressor's ``actorder="static"``): columns solved by descending
    ``diag(H)`` with static groups, no permutation stored. ``act_order=False``: natural order, dynamic groups.
    ``grid="imatrix"`` (default; int3:g64 SmolLM2 one-shot ppl 39.7 vs 56.1 with ``"minmax"``, the reference grid).
    """

    name: ClassVar[str] = "gptq"
    requires: ClassVar[frozenset[Stat]] = frozenset({Stat.GRAM})
    format_types: ClassVar[tuple[type, ...]] = (IntGroup,)

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    grid: str = "imatrix"  # static grids clipped to minimize the diag(H)-weighted error; "minmax": the reference

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 10):
            raise ConfigError(f"GPTQ.damp must be a fraction in [0, 10), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"GPTQ.block_size must be a positive integer, got {self.block_size!r}")

    def apply(self, w: torch.Tensor, stats: LayerStats, *, layer: str = "<layer>") -> CompressedWeight:
        check_weight(w, layer)
        self.format.check(tuple(w.shape), layer)
        return gptq_quantize(w, stats.hessian(self.name, layer), self.format, damp=self.damp,
                             block_size=self.block_size, act_order=self.act_order,
                             static_groups=self.static_groups, grid=self.grid, layer=layer)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: IntGroup, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  grid: str = "minmax", layer: str = "<layer>", fused: bool | None = None) -> IntGroupWeight:
    """The GPTQ solve as a function (``W [out, in]``, ``H [in, in]``) -> ``IntGroupWeight`` (see module note).

    ``fused``: run each block's column loop in one Triton kernel (default: on CUDA; see :func:`.obs.obs_solve`).
    """
    out, inp = w.shape
    g = fmt.group(inp)
    use_order = act_order or fmt.act_order
    order = act_order_perm(hessian) if use_order else None
    if grid not in ("minmax", "imatrix"):
        raise ConfigError(f"GPTQ grid must be 'minmax' or 'imatrix', got {grid!r}")
    static = (static_groups or (use_order and not fmt.act_order) or fmt.group_size is None or grid == "imatrix")
    grids = None
    if static:
        # Grids from W with dead inputs zeroed, as the loop will see it; per-channel needs no order mapping.
        # With ':act' the stored groups run in solve order, so they are fitted on the permuted matrix.
        wz = w.float().clone()
        wz[:, hessian.diagonal() == 0] = 0.0
        if fmt.act_order:
            wz = wz[:, order]
        if grid == "imatrix":  # clipped grids minimizing the diag(H)-weighted error (see rtn_imatrix)
            from .rtn_imatrix import weighted_grid

            imp = hessian.diagonal().float().clamp(min=0)
            imp = (imp if not fmt.act_order else imp[order]) + 1e-6 * float(imp.mean()) + 1e-30
            grids = weighted_grid(wz.reshape(out, inp // g, g), imp.reshape(inp // g, g), fmt)
        else:
            grids = fit_scale_zero(wz.reshape(out, inp // g, g), fmt)
    bs = max(block_size // g, 1) * g if g <= block_size else g
    natural_groups = static and not fmt.act_order
    proj = GroupProjector(fmt, out, inp, order=order if natural_groups else None, static=grids, device=w.device)
    obs_solve(w, hessian, proj, block_size=bs, damp=damp, order=order, layer=layer, sync=math.gcd(16, g),
              fused=fused)
    codes = proj.codes.to(torch.int64)
    perm = None
    if order is not None and not fmt.act_order:  # static groups: store codes in natural order
        inv = torch.empty_like(order)
        inv[order] = torch.arange(inp, device=order.device)
        codes = codes[:, inv]
    elif fmt.act_order:
        perm = order
    out_w = IntGroupWeight.from_codes(fmt, codes, proj.scale, proj.zero, perm)
    # GPTQ is greedy, so on rare matrices plain rounding scores better; keep whichever has the lower layer objective
    # (costs two GEMMs; makes "never worse than RTN on the same H" a guarantee rather than a tendency).
    rtn = quantize_rtn(w.float(), fmt, perm)
    if layer_objective(w, rtn.decode(), hessian) < layer_objective(w, out_w.decode(), hessian):
        log.info("layer %r: GPTQ scored worse than RTN on its Hessian; keeping RTN", layer)
        return rtn
    return out_w
