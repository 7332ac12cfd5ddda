"""``tensorslim inspect MODEL --spectra``: the singular-value spectrum of every block linear.

Per matrix: the shape, the singular-value decay (``sigma_i / sigma_0`` at 1/10/25/50/75% of the full rank), the
ranks keeping 90/95/99% of the energy ``sum sigma_i^2``, the stable rank ``||W||_F^2 / sigma_0^2``, the break-even
rank ``out*in/(out+in)`` below which factors save memory, and WeLore's class (Jaiswal et al., arXiv 2407.11239):
"LRC" (a low-rank component: WeLore's global threshold at ``welore_target`` parameter reduction cuts it) or "N-LRC"
(it stays dense). Optionally a PNG of all normalized spectra (matplotlib, Agg canvas, no pyplot global state).
Data-free: one float32 ``svdvals`` per matrix (SmolLM2-135M: 210 matrices, well under a minute on 2 CPU cores).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .methods.welore import allocate_ranks, singular_values

logger = logging.getLogger(__name__)

ENERGIES = (0.90, 0.95, 0.99)
DECAY_AT = (0.01, 0.10, 0.25, 0.50, 0.75)


def energy_rank(sigma: torch.Tensor, fraction: float) -> int:
    """Smallest ``k`` with ``sum_{i<k} sigma_i^2 >= fraction * sum sigma_i^2``."""
    e = sigma.double() ** 2
    cum = e.cumsum(0) / e.sum().clamp(min=1e-300)
    return min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))) + 1, sigma.numel())


def spectrum_summary(name: str, w: torch.Tensor, sigma: torch.Tensor) -> dict[str, Any]:
    o, i = int(w.shape[0]), int(w.shape[1])
    n = sigma.numel()
    top = float(sigma[0]) if n else 0.0
    row: dict[str, Any] = {"name": name, "shape": [o, i], "full_rank": n, "break_even_rank": o * i // (o + i)}
    for f in ENERGIES:
        row[f"rank_{round(f * 100)}"] = energy_rank(sigma, f)
    row["stable_rank"] = float((sigma.double() ** 2).sum() / max(top, 1e-300) ** 2)
    row["decay"] = {f"{round(f * 100)}%": float(sigma[min(int(f * n), n - 1)] / max(top, 1e-300)) for f in DECAY_AT}
    return row


def inspect_spectra(
    model: nn.Module,
    adapter,
    out_png: Path | None = None,
    *,
    welore_target: float = 0.3,
) -> list[dict[str, Any]]:
    """One summary dict per block linear (see the module note); writes the spectra plot to ``out_png`` if given."""
    names = adapter.linear_names(model)
    weights = {n: model.get_submodule(n).weight.detach().float() for n in names}
    sv = singular_values(weights)
    ranks = allocate_ranks(weights, welore_target, "welore", spectra=sv)
    rows = []
    for n in names:
        row = spectrum_summary(n, weights[n], sv[n])
        row["welore_rank"] = ranks[n]
        row["welore_class"] = "N-LRC" if ranks[n] is None else "LRC"
        rows.append(row)
    if out_png is not None:
        plot_spectra({n: sv[n] for n in names}, Path(out_png), title=f"{type(model).__name__}: singular values")
    return rows


def plot_spectra(spectra: dict[str, torch.Tensor], path: Path, *, title: str = "singular values") -> Path:
    """Normalized spectra (``sigma_i / sigma_0`` vs ``i / rank``), one line per matrix, colored by its role."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    roles: dict[str, str] = {}
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    for name, s in spectra.items():
        role = name.rsplit(".", 1)[-1]
        color = roles.setdefault(role, palette[len(roles) % len(palette)])
        s = s.double()
        x = torch.arange(s.numel(), dtype=torch.float64) / max(s.numel() - 1, 1)
        ax.plot(x.numpy(), (s / s[0].clamp(min=1e-300)).numpy(), color=color, alpha=0.35, linewidth=0.8)
    for role, color in roles.items():
        ax.plot([], [], color=color, label=role)
    ax.set_yscale("log")
    ax.set_xlabel("index / full rank")
    ax.set_ylabel("sigma_i / sigma_0")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    logger.info("wrote the spectra plot to %s", path)
    return path
