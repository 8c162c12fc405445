"""Figures of ``robustdet compare --plot``: AP against iteration per group (mean over seeds with a ±1 std
band), the final AP per group (mean with ±1 std error bars and each seed as a dot), and, with a baseline,
the paired difference to it with its 95 % t interval (statistics in robustdet.runs.compare)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from robustdet.runs.compare import Group, mean_std, paired_difference


def _facets(groups: Sequence[Group]) -> tuple[str | None, list[str], dict[str, str]]:
    """With two or more label keys the last one makes the panels (or the clusters of bars), the others
    the colours: e.g. one panel per noise level, one colour per method. Returns the facet key, the
    colour names in order, and each group's colour name."""
    keys = list(groups[0].labels) if groups else []
    if len(keys) >= 2 and all(list(g.labels) == keys for g in groups):
        facet, hue_keys = keys[-1], keys[:-1]
        hue = {g.label: " ".join(f"{k}={g.labels[k]}" for k in hue_keys) for g in groups}
    else:
        facet, hue = None, {g.label: g.label for g in groups}
    return facet, list(dict.fromkeys(hue.values())), hue


def _colours(names: list[str]) -> dict[str, tuple[float, ...]]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _curve(group: Group, metric: str) -> tuple[list[int], np.ndarray]:
    """Iterations every run of the group evaluated at, and the runs' values there (runs x iterations)."""
    per_run = [{it: bbox[metric] for it, bbox in r.evals} for r in group.runs]
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    return common, np.array([[p[it] for it in common] for p in per_run], dtype=float)


def plot_curves(groups: Sequence[Group], path: Path, metric: str = "AP") -> Path:
    facet, hues, hue_of = _facets(groups)
    colour = _colours(hues)
    panels = list(dict.fromkeys(g.labels[facet] for g in groups)) if facet else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 3.8), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for g in groups:
            if facet and g.labels[facet] != panel:
                continue
            iters, values = _curve(g, metric)
            if not iters:
                continue
            mean = values.mean(axis=0)
            c = colour[hue_of[g.label]]
            ax.plot(iters, mean, color=c, label=f"{hue_of[g.label]} (n={len(g.runs)})", linewidth=1.5,
                    marker="o" if len(iters) < 12 else None, markersize=3)
            if len(g.runs) > 1:
                std = values.std(axis=0, ddof=1)
                ax.fill_between(iters, mean - std, mean + std, color=c, alpha=0.2, linewidth=0)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if panel is not None:
            ax.set_title(f"{facet}={panel}", fontsize=10)
    axes[0][0].set_ylabel(f"{metric} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a colour missing from the first panel still gets its legend entry
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"{metric} during training: mean over seeds, band ±1 std", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _bar_layout(groups: Sequence[Group]) -> tuple[dict[str, float], float, list[tuple[float, str]], dict[str, str]]:
    """x position of each group's bar, the bar width, the tick positions and names, and each group's colour."""
    facet, hues, hue_of = _facets(groups)
    if facet is None:
        xs = {g.label: float(i) for i, g in enumerate(groups)}
        return xs, 0.7, [(float(i), g.label) for i, g in enumerate(groups)], hue_of
    panels = list(dict.fromkeys(g.labels[facet] for g in groups))
    width = 0.8 / len(hues)
    xs = {
        g.label: panels.index(g.labels[facet]) + (hues.index(hue_of[g.label]) - (len(hues) - 1) / 2) * width
        for g in groups
    }
    return xs, width, [(float(i), f"{facet}={p}") for i, p in enumerate(panels)], hue_of


def _bars(ax: plt.Axes, groups: Sequence[Group], heights: dict[str, float], errors: dict[str, tuple[float, float]],
          dots: dict[str, list[float]] | None = None, all_groups: Sequence[Group] | None = None) -> None:
    xs, width, ticks, hue_of = _bar_layout(groups)
    # colours from all groups, so that a method has the same colour in every figure
    colour = _colours(_facets(all_groups or groups)[1])
    seen = set()
    for g in groups:
        if g.label not in heights:
            continue
        h = hue_of[g.label]
        lo, hi = errors.get(g.label, (math.nan, math.nan))
        yerr = None if math.isnan(lo) else [[heights[g.label] - lo], [hi - heights[g.label]]]
        ax.bar(xs[g.label], heights[g.label], width * 0.9, color=colour[h], label=None if h in seen else h,
               yerr=yerr, capsize=3, error_kw={"linewidth": 1})
        seen.add(h)
        if dots and dots.get(g.label):
            k = len(dots[g.label])
            # spread across the bar, off the error bar in its middle
            offsets = np.linspace(-0.3, 0.3, k) * width if k > 1 else np.zeros(1)
            ax.scatter(xs[g.label] + offsets, dots[g.label], s=10, color="white", edgecolors="black",
                       linewidths=0.7, zorder=3)
    names = [n for _, n in ticks]
    # slanted when the names would run into each other (about 10 characters fit under a bar cluster)
    slant = len(ticks) > 1 and max(len(n) for n in names) > 10
    ax.set_xticks([t for t, _ in ticks], names, rotation=25 if slant else 0, ha="right" if slant else "center",
                  fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if len(seen) > 1 and any(h != g.label for g in groups for h in [hue_of[g.label]]):
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def plot_final_bars(groups: Sequence[Group], path: Path, metric: str = "AP") -> Path:
    heights, errors, dots = {}, {}, {}
    for g in groups:
        vals = list(g.values(metric).values())
        if not vals:
            continue
        mean, std = mean_std(vals)
        heights[g.label], errors[g.label], dots[g.label] = mean, (mean - std, mean + std), vals
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(groups) + 3), 4))
    _bars(ax, groups, heights, errors, dots)
    ax.set_ylabel(f"final {metric} (%)")
    ax.set_title(f"final {metric}: mean over seeds with ±1 std; circles: the seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_differences(
    groups: Sequence[Group], base: dict[str, Group | None], path: Path, metric: str = "AP",
    confidence: float = 0.95,
) -> Path:
    compared = [g for g in groups if base.get(g.label) is not None]
    heights, errors = {}, {}
    for g in compared:
        b = base[g.label]
        assert b is not None
        d = paired_difference(g.values(metric), b.values(metric), confidence)
        if d.n:
            heights[g.label], errors[g.label] = d.mean, (d.low, d.high)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(compared) + 3), 4))
    _bars(ax, compared, heights, errors, all_groups=groups)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"Δ {metric} (points)")
    baselines = sorted({b.label for b in base.values() if b is not None})
    ax.set_title(f"{metric} minus the baseline's, paired by seed: mean and {confidence:.0%} t interval\n"
                 f"baseline: {'; '.join(baselines)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_comparison(
    groups: Sequence[Group], out_dir: Path, base: dict[str, Group | None] | None = None, metric: str = "AP"
) -> list[Path]:
    """Write ``<metric>_vs_iter.png``, ``final_<metric>.png`` and, with a baseline, ``<metric>_difference.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [plot_curves(groups, out_dir / f"{metric}_vs_iter.png", metric),
             plot_final_bars(groups, out_dir / f"final_{metric}.png", metric)]
    if base and any(b is not None for b in base.values()):
        files.append(plot_differences(groups, base, out_dir / f"{metric}_difference.png", metric))
    return files
