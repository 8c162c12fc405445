"""σ against label noise (issue 10, part 4): does Bayesian RetinaNet's learned σ track the noise?

Reads the cells of the σ sweep (``experiments/noise/sigma.yaml``: Bayesian RetinaNet, box jitter alone at
5 levels and class flips alone at 5 levels, 2 seeds), takes each cell's noise from its own
``config.yaml`` (``data.train.label_noise``) and its final σ = exp(s/2) from ``log.jsonl``, and writes

- ``OUT/sigma.csv``: one row per run (kind, level, seed, σ_cls, σ_reg, the run's final AP and AP50, and two
  convergence checks over the last quarter of training: how far s still moved, and how fast against the
  fastest Adam allows);
- ``OUT/sigma_vs_noise.png``: σ_reg against box jitter, σ_cls against class flips;
- ``OUT/log_var_trajectories.png``: s_cls and s_reg against iteration for every run;

and prints Spearman's rank correlation with its two-sided permutation p-value for the four
pairings (the two the question is about, and the two crossed ones as controls).

    .venv/bin/python experiments/noise/sigma_study.py runs/noise/sigma --out experiments/noise
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from itertools import pairwise
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from scipy import stats

from robustdet.files import read_jsonl

TASKS = ("cls", "reg")
KINDS = {"box_jitter": "reg", "class_flip": "cls"}  # the noise kind and the task whose σ should follow it


def load_cell(cell: Path) -> dict | None:
    """A finished cell's noise, seed, final σ's and s trajectories; None while it has not finished."""
    if not (cell / "metrics.json").exists():
        return None
    cfg = yaml.safe_load((cell / "config.yaml").read_text())
    noise = cfg["data"]["train"].get("label_noise") or {}
    jitter, flip = float(noise.get("box_jitter", 0.0)), float(noise.get("class_flip", 0.0))
    records = [r for r in read_jsonl(cell / "log.jsonl") if "loss/log_var/cls" in r]
    if not records:  # plain losses: no σ to study
        return None
    iters = [r["iter"] for r in records]
    s = {t: [r[f"loss/log_var/{t}"] for r in records] for t in TASKS}
    quarter = next(i for i, it in enumerate(iters) if it >= 0.75 * iters[-1])
    opt = cfg["train"]["optimizer"]
    # the log-variances' group follows the model's schedule, scaled from the model's lr to its own
    log_var_lr = [r["lr"] * (opt.get("log_var_lr") or opt["lr"]) / opt["lr"] for r in records]
    bbox = json.loads((cell / "metrics.json").read_text())["bbox"]
    return {
        "cell": cell.name,
        # a sweep of several weightings (the grid's bayesian and bayesian+rlo) is tabled per weighting
        "weighting": cfg["weighting"]["name"],
        # both at once (the grid's noise levels): shown, but outside the one-kind-at-a-time correlations
        "kind": "combined" if jitter and flip else "box_jitter" if jitter else "class_flip" if flip else "clean",
        "level": max(jitter, flip),
        "seed": cfg["seed"],
        **{f"sigma_{t}": math.exp(s[t][-1] / 2) for t in TASKS},
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        **{f"s_{t}_last_quarter_change": s[t][-1] - s[t][quarter] for t in TASKS},
        **{f"s_{t}_late_speed": late_speed(iters, s[t], log_var_lr, quarter) for t in TASKS},
        "iters": iters,
        "s": s,
    }


def late_speed(iters: list[int], s: list[float], lr: list[float], quarter: int) -> float:
    """Over the last quarter: the path s travelled over the sum of its learning rates (Adam's longest path).

    Adam moves a parameter about its learning rate a step while the gradient keeps its sign, so a ratio
    near 1 means s was still being pushed as fast as the optimizer allows (σ would measure the optimizer),
    near 0 that it sat at its minimum. The last quarter's plain change is small under a cosine schedule
    either way, because the learning rate is.
    """
    path = sum(abs(b - a) for a, b in pairwise(s[quarter:]))
    budget = sum(lr[i] * (iters[i] - iters[i - 1]) for i in range(quarter + 1, len(iters)))
    return path / budget


def spearman(runs: list[dict], kind: str, task: str) -> tuple[int, float, float]:
    """Over the clean runs and the runs with noise of ``kind`` (of one weighting: the caller's choice of
    ``runs``): ρ between the level and σ_task, and its two-sided permutation p-value.

    The p-value is a permutation test of the pairing (exact up to 8 runs, 100,000 random pairings beyond),
    not spearmanr's t approximation: with 10 runs and ρ near 1 that approximation prints p ~ 1e-24,
    where no pairing of 10 runs can be rarer than 1 in 10! ≈ 3.6e6."""
    chosen = [r for r in runs if r["kind"] in ("clean", kind)]
    levels, sigmas = [r["level"] for r in chosen], [r[f"sigma_{task}"] for r in chosen]
    if len(set(levels)) < 2 or len(set(sigmas)) < 2:  # no ranking to correlate: scipy would warn and give nan
        return len(chosen), math.nan, math.nan
    rx = stats.rankdata(levels) - (len(levels) + 1) / 2  # Spearman's ρ is Pearson's r of the average ranks

    def rho(ry: np.ndarray, axis: int = -1) -> np.ndarray:
        ry = ry - ry.mean(axis=axis, keepdims=True)
        return (rx * ry).sum(axis=axis) / np.sqrt((rx**2).sum() * (ry**2).sum(axis=axis))

    test = stats.permutation_test(
        (stats.rankdata(sigmas),), rho, permutation_type="pairings", vectorized=True, n_resamples=100_000,
        alternative="two-sided", rng=np.random.default_rng(0),
    )  # fmt: skip
    return len(chosen), float(test.statistic), float(test.pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the σ sweep's directory")
    parser.add_argument("--out", type=Path, default=Path("experiments/noise"))
    args = parser.parse_args()
    runs = [r for c in sorted(p for p in args.sweep.iterdir() if p.is_dir()) if (r := load_cell(c)) is not None]
    if not runs:
        raise SystemExit(f"{args.sweep}: no finished cells")
    args.out.mkdir(parents=True, exist_ok=True)
    measured = (k for k in runs[0] if k.startswith(("sigma_", "AP", "s_")))
    fields = ["cell", "weighting", "kind", "level", "seed", *measured]
    with open(args.out / "sigma.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(runs, key=lambda r: (r["weighting"], r["kind"], r["level"], r["seed"])):
            writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()})

    print(f"{len(runs)} finished runs in {args.sweep}\n")
    weightings = sorted({r["weighting"] for r in runs})
    print("| weighting | noise | level | seeds | σ_cls | σ_reg | AP50 | late speed of s_cls, s_reg |")
    print("|---|---|---|---|---|---|---|---|")
    for w in weightings:
        for kind in ("clean", "box_jitter", "class_flip", "combined"):
            for level in sorted({r["level"] for r in runs if r["kind"] == kind}):
                group = sorted(
                    (r for r in runs if (r["weighting"], r["kind"], r["level"]) == (w, kind, level)),
                    key=lambda r: r["seed"],
                )
                if not group:
                    continue
                sigmas = " | ".join(" / ".join(f"{r[f'sigma_{t}']:.3f}" for r in group) for t in TASKS)
                ap50 = " / ".join(f"{r['AP50']:.1f}" for r in group)
                speeds = " / ".join(", ".join(f"{r[f's_{t}_late_speed']:.2f}" for t in TASKS) for r in group)
                seeds = ",".join(str(r["seed"]) for r in group)
                print(f"| {w} | {kind} | {level:g} | {seeds} | {sigmas} | {ap50} | {speeds} |")
    print("\nSpearman's rank correlation, clean runs included (two-sided permutation p):\n")
    print("| weighting | σ | against | runs | ρ | p (permutation) |")
    print("|---|---|---|---|---|---|")
    for w in weightings:
        of_w = [r for r in runs if r["weighting"] == w]
        for kind, task in (("box_jitter", "reg"), ("class_flip", "cls"), ("box_jitter", "cls"), ("class_flip", "reg")):
            if not any(r["kind"] == kind for r in of_w):
                continue
            n, rho, p = spearman(of_w, kind, task)
            note = "" if KINDS[kind] == task else " (control)"
            stat = "- | - (constant)" if math.isnan(rho) else f"{rho:+.2f} | {p:.3g}"
            print(f"| {w} | σ_{task} | {kind}{note} | {n} | {stat} |")
    worst = {t: max(abs(r[f"s_{t}_last_quarter_change"]) for r in runs) for t in TASKS}
    speed = {t: max(r[f"s_{t}_late_speed"] for r in runs) for t in TASKS}
    print(
        "\nconvergence, over all runs, in the last quarter of training: the largest change of s "
        + ", ".join(f"s_{t} {worst[t]:.3f}" for t in TASKS)
        + "; the largest late speed (path of s / sum of its learning rates; 1 = as fast as Adam moves) "
        + ", ".join(f"s_{t} {speed[t]:.2f}" for t in TASKS)
    )

    pairs = [(k, t) for k, t in (("box_jitter", "reg"), ("class_flip", "cls")) if any(r["kind"] == k for r in runs)]
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(10, 4), squeeze=False)
    for ax, (kind, task) in zip(axes[0], pairs, strict=False):
        chosen = [r for r in runs if r["kind"] in ("clean", kind)]
        for w, seed in sorted({(r["weighting"], r["seed"]) for r in chosen}):
            pts = sorted((r["level"], r[f"sigma_{task}"]) for r in chosen if (r["weighting"], r["seed"]) == (w, seed))
            label = f"seed {seed}" if len(weightings) == 1 else f"{w}, seed {seed}"
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], "o-", label=label)
        title = f"σ_{task} vs {kind.replace('_', ' ')}"
        if len(weightings) == 1:  # ρ pools the runs of one weighting only (the table has one per weighting)
            n, rho, p = spearman(runs, kind, task)
            title += f": Spearman ρ = {rho:+.2f} (p = {p:.2g}, n = {n})"
        ax.set_title(title)
        ax.set_xlabel(f"{kind.replace('_', ' ')} (%)")
        ax.set_ylabel(f"final σ_{task}")
        ax.legend()
    fig.tight_layout()
    if pairs:
        fig.savefig(args.out / "sigma_vs_noise.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    cmap = plt.get_cmap("viridis")
    for ax, task in zip(axes, TASKS, strict=True):
        for r in runs:
            colour = "black" if r["kind"] == "clean" else cmap(r["level"] / 0.4 * 0.9)
            style = {"clean": "-", "box_jitter": "-", "class_flip": "--", "combined": ":"}[r["kind"]]
            ax.plot(r["iters"], r["s"][task], style, color=colour, lw=0.8, alpha=0.8)
        ax.set_title(f"s_{task} = log σ²_{task} per run")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"s_{task}")
    fig.suptitle("black: clean; solid: box jitter, dashed: class flips, dotted: both; lighter: more noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "log_var_trajectories.png", dpi=110)
    plt.close(fig)
    names = ("sigma.csv", *(("sigma_vs_noise.png",) if pairs else ()), "log_var_trajectories.png")
    print("\nwrote " + ", ".join(str(args.out / n) for n in names))


if __name__ == "__main__":
    main()
