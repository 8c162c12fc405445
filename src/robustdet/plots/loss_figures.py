"""Figures of the Bayesian losses: the paper's Figures 1 and 2 (Khanzhina et al.) and the loss against s.

Drawn with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure``), so nothing touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from robustdet.losses import (
    bayesian_focal_loss,
    bayesian_smooth_l1_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
)

__all__ = [
    "BATCH_MIX",
    "batch_mix_loss",
    "batch_mix_minimiser",
    "plot_bayesian_focal",
    "plot_bayesian_smooth_l1",
    "plot_focal_vs_log_var",
    "plot_paper_figures",
]

# The batch of docs/losses.md: 99 well-classified anchors (p_t = 0.95) and one hard one (p_t = 0.1),
# as (p_t, count) pairs; γ = 2, no α (α_t would scale every anchor alike and move nothing in s).
BATCH_MIX: tuple[tuple[float, int], ...] = ((0.95, 99), (0.1, 1))

_DPI = 120


def _logit(p_t: torch.Tensor) -> torch.Tensor:
    return torch.log(p_t) - torch.log1p(-p_t)


def _per_anchor_focal(p_t: float, log_vars: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """BFL (Eq. 16) of one positive anchor with probability p_t, for each s in ``log_vars``."""
    x = _logit(torch.tensor([p_t], dtype=torch.float64))
    one = torch.ones(1, dtype=torch.float64)
    return torch.stack([bayesian_focal_loss(x, one, s, alpha=-1.0, gamma=gamma)[0] for s in log_vars])


def batch_mix_loss(log_vars: torch.Tensor, mix: tuple[tuple[float, int], ...] = BATCH_MIX) -> torch.Tensor:
    """Mean per-anchor BFL (γ = 2, no α) of the anchors in ``mix`` at each s of ``log_vars`` (float64)."""
    total = sum(count * _per_anchor_focal(p_t, log_vars) for p_t, count in mix)
    return total / sum(count for _, count in mix)


def batch_mix_minimiser(
    mix: tuple[tuple[float, int], ...] = BATCH_MIX, low: float = -1.0, high: float = 2.0, tol: float = 1e-6
) -> float:
    """The local minimum in s of :func:`batch_mix_loss` on [low, high], by grid then golden section."""
    grid = torch.linspace(low, high, 301, dtype=torch.float64)
    values = batch_mix_loss(grid, mix)
    i = int(torch.argmin(values))
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def f(s: float) -> float:
        return float(batch_mix_loss(torch.tensor([s], dtype=torch.float64), mix)[0])

    while b - a > tol:
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return 0.5 * (a + b)


def _finish(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _style(ax: Axes, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()


def plot_bayesian_smooth_l1(path: Path | str, beta: float = 1.0) -> Path:
    """Figure 1 of Khanzhina et al.: Bayesian smooth L1 (Eq. 14) at σ = 0.5 and 2.0 against smooth L1
    (Eq. 6), over the error ε, with threshold c = ``beta`` (the paper's 1/β²)."""
    err = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    zero = torch.zeros_like(err)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for sigma, colour in ((0.5, "tab:blue"), (2.0, "tab:green")):
        s = 2.0 * math.log(sigma)
        loss = bayesian_smooth_l1_loss(err, zero, s, beta=beta)
        ax.plot(err, loss, color=colour, label=f"Bayesian smooth L1, σ = {sigma}")
    ax.plot(err, smooth_l1_loss(err, zero, beta=beta), color="tab:red", label="smooth L1")
    for side in (-beta, beta):
        ax.axvline(side, color="grey", linewidth=0.8, linestyle=":")
    _style(ax, "error ε", "loss", f"Bayesian smooth L1 (Eq. 14), c = {beta:g}")
    return _finish(fig, Path(path))


def plot_bayesian_focal(path: Path | str, gamma: float = 2.0) -> Path:
    """Figure 2 of Khanzhina et al.: Bayesian focal loss (Eq. 16) at σ = 0.7, 1.0, 2.0 over p_t, with
    torchvision's focal loss dotted on top of σ = 1 (where the two must coincide)."""
    import torchvision  # only for the overlay that shows σ = 1 is the focal loss

    p_t = torch.linspace(0.005, 0.995, 397, dtype=torch.float64)
    x = _logit(p_t)
    one = torch.ones_like(x)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for sigma, colour in ((0.7, "tab:blue"), (1.0, "tab:red"), (2.0, "tab:green")):
        loss = bayesian_focal_loss(x, one, 2.0 * math.log(sigma), alpha=-1.0, gamma=gamma)
        label = f"Bayesian focal, σ = {sigma}" + (" (= focal loss)" if sigma == 1.0 else "")
        ax.plot(p_t, loss, color=colour, label=label)
    ax.plot(
        p_t,
        torchvision.ops.sigmoid_focal_loss(x, one, alpha=-1, gamma=gamma),
        color="black",
        linestyle=":",
        label="torchvision focal loss",
    )
    ax.plot(p_t, sigmoid_focal_loss(x, one, alpha=-1.0, gamma=0.0), color="grey", linewidth=0.8,
            label="cross-entropy (γ = 0)")
    ax.set_ylim(-0.1, 5.0)
    title = f"Bayesian focal loss (Eq. 16), γ = {gamma:g}"
    _style(ax, "probability of the ground-truth class p_t", "loss", title)
    return _finish(fig, Path(path))


def plot_focal_vs_log_var(path: Path | str) -> Path:
    """Per-anchor Bayesian focal loss (Eq. 16, γ = 2, no α) against s = log σ² for an easy anchor, a hard
    anchor and the batch :data:`BATCH_MIX`, with the mix's local minimum marked (docs/losses.md)."""
    s = torch.linspace(-3.0, 8.0, 1101, dtype=torch.float64)
    (easy_p, _), (hard_p, _) = BATCH_MIX
    # The easy anchor's loss dips below zero for s < 0 by only ~1e-5: a panel of its own shows it.
    zoom = torch.linspace(-1.5, 0.5, 401, dtype=torch.float64)
    fig = Figure(figsize=(17.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 4)
    panels = (
        (s, f"easy anchor, p_t = {easy_p}", _per_anchor_focal(easy_p, s), "tab:blue"),
        (zoom, f"easy anchor, p_t = {easy_p}: zoom on s < 0", _per_anchor_focal(easy_p, zoom), "tab:blue"),
        (s, f"hard anchor, p_t = {hard_p}", _per_anchor_focal(hard_p, s), "tab:red"),
        (s, "batch mix: " + " + ".join(f"{n} × p_t = {p}" for p, n in BATCH_MIX), batch_mix_loss(s),
         "tab:purple"),
    )
    for ax, (x, title, loss, colour) in zip(axes, panels, strict=True):
        ax.plot(x, loss, color=colour, label="mean loss per anchor" if "mix" in title else "loss")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.axvline(0.0, color="grey", linewidth=0.6, linestyle=":")
        _style(ax, "s = log σ²", "Bayesian focal loss", title)
    dip = float(panels[1][2].min())
    axes[1].set_ylim(2.0 * dip, -2.0 * dip)
    axes[1].annotate(f"minimum {dip:.2g}", (float(zoom[int(panels[1][2].argmin())]), dip),
                     textcoords="offset points", xytext=(-40, -14), fontsize=8)
    axes[2].set_ylim(-0.5, 5.0)
    axes[2].text(0.5, 0.9, "(clipped at 5)", transform=axes[2].transAxes, ha="center", fontsize=8)

    s_min = batch_mix_minimiser()
    f_min = float(batch_mix_loss(torch.tensor([s_min], dtype=torch.float64))[0])
    mix_loss = panels[3][2]
    right = s > s_min
    i_max = int(torch.argmax(mix_loss[right]))
    s_max, f_max = float(s[right][i_max]), float(mix_loss[right][i_max])
    axes[3].plot([s_min, s_max], [f_min, f_max], "o", color="black")
    axes[3].annotate(f"local minimum s = {s_min:.2f}", (s_min, f_min), textcoords="offset points",
                     xytext=(6, 14))
    axes[3].annotate(f"barrier s = {s_max:.2f}; beyond it the loss falls to 0 as s → ∞", (s_max, f_max),
                     textcoords="offset points", xytext=(-60, 12), fontsize=8)
    return _finish(fig, Path(path))


def plot_paper_figures(out_dir: Path | str) -> list[Path]:
    """Write bayesian_smooth_l1.png (Figure 1), bayesian_focal.png (Figure 2) and focal_vs_log_var.png
    into ``out_dir`` (created if missing); returns their paths."""
    out = Path(out_dir)
    return [
        plot_bayesian_smooth_l1(out / "bayesian_smooth_l1.png"),
        plot_bayesian_focal(out / "bayesian_focal.png"),
        plot_focal_vs_log_var(out / "focal_vs_log_var.png"),
    ]
