"""Plots and tables that show what the methods did in a run: ``robustdet report`` and ``compare``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from robustdet.engine.evaluator import METRIC_NAMES


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _series_plot(
    path: Path, iters: list[int], series: dict[str, list[float]], title: str, ylabel: str, logy: bool = False
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(iters, ys, label=name, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if logy:
        # the Bayesian losses go negative once s < 0 (their log σ terms): a log axis would drop those points
        positive = all(y > 0 for ys in series.values() for y in ys)
        if positive:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1e-2)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_level(records: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    names = records[-1]["level_names"]
    return {name: [r[key][i] for r in records] for i, name in enumerate(names)}


def make_report(run_dir: str | Path) -> list[Path]:
    """Write ``report/*.png`` and ``report/metrics.md`` for a run directory; return the files."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "log.jsonl")
    if not records:
        raise FileNotFoundError(f"{run_dir / 'log.jsonl'}: no training log to report on")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    iters = [r["iter"] for r in records]
    files = [
        _series_plot(out / "loss.png", iters, {"total (weighted)": [r["loss"] for r in records]},
                     "training loss", "loss", logy=True),
        _series_plot(out / "level_losses.png", iters, _per_level(records, "level_losses"),
                     "unweighted loss per pyramid level", "L_i", logy=True),
        _series_plot(out / "level_weights.png", iters, _per_level(records, "level_weights"),
                     "loss weight per pyramid level (w_i)", "w_i"),
        _series_plot(out / "lr.png", iters, {"lr": [r["lr"] for r in records]}, "learning rate", "lr"),
    ]
    if "rpn_cls" in records[-1]:
        # Faster R-CNN: the RPN's per-level losses, logged but outside the weighting (Luo et al. omit the RPN)
        rpn_levels = [f"P{k + 2}" for k in range(len(records[-1]["rpn_cls"]))]
        rpn = {f"{part} {lvl}": [r[part][k] for r in records] for part in ("rpn_cls", "rpn_reg")
               for k, lvl in enumerate(rpn_levels)}
        files.append(_series_plot(out / "rpn_losses.png", iters, rpn, "RPN loss per anchor level (unweighted)",
                                  "loss", logy=True))
    if "rlo_probabilities" in records[-1]:
        names = ("(AVW)", "(smallest L)", "(largest L)", "(equal)")
        probs = {
            f"a{k} {names[k]}": [r["rlo_probabilities"][k] for r in records]
            for k in range(len(records[-1]["rlo_probabilities"]))
        }
        files.append(_series_plot(out / "rlo_probabilities.png", iters, probs, "RLO action probabilities", "p_k"))
    log_var_keys = [k for k in records[-1] if k.startswith("log_var_") and isinstance(records[-1][k], float)]
    if log_var_keys:
        sig = {k.removeprefix("log_var_"): [math.exp(r[k] / 2) for r in records] for k in log_var_keys}
        files.append(_series_plot(out / "sigma.png", iters, sig, "learned σ = exp(s/2) per task", "σ"))
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        md = out / "metrics.md"
        md.write_text(metrics_markdown(metrics))
        files.append(md)
    return files


def metrics_markdown(metrics: dict[str, Any]) -> str:
    bbox = metrics["bbox"]
    lines = ["| " + " | ".join(METRIC_NAMES) + " |", "|" + "---|" * len(METRIC_NAMES)]
    lines.append("| " + " | ".join(f"{bbox[k]:.1f}" for k in METRIC_NAMES) + " |")
    per_class = metrics.get("per_class") or {}
    if per_class:
        lines += ["", "| class | AP |", "|---|---|"]
        lines += [f"| {name} | {ap:.1f} |" for name, ap in per_class.items()]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[str | Path], metrics: list[str] | None = None) -> str:
    """A side-by-side table of the runs' final metrics (and final σ where Bayesian)."""
    metrics = metrics or ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]
    rows = []
    for d in map(Path, run_dirs):
        path = d / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: the run has no final metrics (did it finish?)")
        m = json.loads(path.read_text())["bbox"]
        last = read_jsonl(d / "log.jsonl")
        extra = ""
        if last:
            sig = {k.removeprefix("log_var_"): math.exp(v / 2) for k, v in last[-1].items()
                   if k.startswith("log_var_") and isinstance(v, float)}
            extra = " ".join(f"σ_{k}={v:.3f}" for k, v in sig.items())
        rows.append((d.name, [m[k] for k in metrics], extra))
    width = max(len(r[0]) for r in [*rows, ("run", [], "")])
    head = f"{'run':<{width}} " + " ".join(f"{k:>6}" for k in metrics) + "  notes"
    lines = [head, "-" * len(head)]
    for name, vals, extra in rows:
        lines.append(f"{name:<{width}} " + " ".join(f"{v:6.1f}" for v in vals) + f"  {extra}")
    return "\n".join(lines)
