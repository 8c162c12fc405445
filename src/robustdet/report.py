"""``robustdet report``: plots and a metrics table that show what the methods did in one run directory
(read through ``runs/reader.py``; the tables over several runs are ``runs/compare.py``'s)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from robustdet.engine.evaluator import METRIC_NAMES
from robustdet.plots.detection_plots import detection_report
from robustdet.runs.reader import RLO_ACTIONS, read_log, read_metrics


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


def _vector_series(records: list[dict[str, Any]], key: str, names: list[str]) -> dict[str, list[float]]:
    """One series per element of the vector field ``key`` (named by ``names`` when the length fits);
    NaN (a gap in the plot) where a record lacks the field."""
    width = len(next(r[key] for r in reversed(records) if isinstance(r.get(key), list)))
    labels = names if len(names) == width else [str(k) for k in range(width)]

    def value(r: dict[str, Any], i: int) -> float:
        v = r.get(key)
        return float(v[i]) if isinstance(v, list) and i < len(v) else math.nan

    return {label: [value(r, i) for r in records] for i, label in enumerate(labels)}


def field_families(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Every component field (``weighting/…``, ``loss/…``) of the log grouped into plot families.

    ``family/member`` scalars share a plot (``loss/sigma/cls`` and ``loss/sigma/reg``: "loss/sigma"); a
    vector field is a family of its own, one line per level when it has one value per level. Records
    without the field (before a window closed, say) leave gaps.
    """
    last = records[-1]
    levels = last.get("level_names", [])
    keys = sorted({k for r in records for k in r if "/" in k})
    families: dict[str, dict[str, list[float]]] = {}
    for key in keys:
        sample = next(r[key] for r in reversed(records) if key in r)
        if isinstance(sample, list):
            families[key] = _vector_series(records, key, levels)
        elif isinstance(sample, int | float):
            # "loss/sigma/cls" joins the family "loss/sigma"; "weighting/action" is a family of its own
            family, member = key.rsplit("/", 1) if key.count("/") >= 2 else (key, key.rpartition("/")[2])
            families.setdefault(family, {})[member] = [float(r.get(key, math.nan)) for r in records]
    return families


def make_report(run_dir: str | Path) -> list[Path]:
    """Write ``report/*.png`` and ``report/metrics.md`` for a run directory; return the files.

    The engine's own series (loss, per-level losses and weights, lr) come first; then one plot per field
    family the detector and the weighting logged, whatever they are called, so a new weighting's state is
    drawn without any change here; then the losses outside the weighting (Faster R-CNN's RPN).
    """
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / 'log.jsonl'}: no training log to report on")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    iters = [r["iter"] for r in records]
    levels = records[-1]["level_names"]
    files = [
        _series_plot(out / "loss.png", iters, {"total (weighted)": [r["loss"] for r in records]},
                     "training loss", "loss", logy=True),
        _series_plot(out / "level_losses.png", iters, _vector_series(records, "level_losses", levels),
                     "unweighted loss per pyramid level", "L_i", logy=True),
        _series_plot(out / "level_weights.png", iters, _vector_series(records, "level_weights", levels),
                     "loss weight per pyramid level (w_i)", "w_i"),
        _series_plot(out / "lr.png", iters, {"lr": [r["lr"] for r in records]}, "learning rate", "lr"),
    ]
    if "level_plain_losses" in records[-1]:
        files.append(_series_plot(out / "level_plain_losses.png", iters,
                                  _vector_series(records, "level_plain_losses", levels),
                                  "plain loss per pyramid level (σ = 1): what the weighting measures", "L_i",
                                  logy=True))
    for family, series in field_families(records).items():
        name = family.replace("/", "_")
        files.append(_series_plot(out / f"{name}.png", iters, series, family, family.rpartition("/")[2]))
    extra_names = records[-1].get("extra_level_names", [])
    extra_keys = [k for k in records[-1] if isinstance(records[-1][k], list) and extra_names
                  and k not in ("extra_level_names", "level_names") and len(records[-1][k]) == len(extra_names)
                  and not k.startswith("level_") and "/" not in k]
    if extra_keys:
        # losses outside the weighting (Faster R-CNN's RPN by anchor level; Luo et al. omit the RPN)
        extra = {f"{key} {lvl}": [r[key][k] for r in records] for key in extra_keys
                 for k, lvl in enumerate(extra_names)}
        # named after the part the keys share (Faster R-CNN: rpn_cls, rpn_reg -> rpn_losses.png)
        stems = {k.split("_", 1)[0] for k in extra_keys}
        name = f"{stems.pop()}_losses.png" if len(stems) == 1 else "extra_losses.png"
        files.append(_series_plot(out / name, iters, extra,
                                  "losses outside the weighting, per level (unweighted)", "loss", logy=True))
    # PR curves, confusion matrix, AP against iteration (eval.jsonl, detections.json, data.val)
    detection_files, notes = detection_report(run_dir, out)
    files.extend(detection_files)
    for note in notes:
        print(f"robustdet report: note: {note}")
    if (run_dir / "metrics.json").exists():
        metrics = read_metrics(run_dir)
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


def methods_summary(records: list[dict[str, Any]]) -> list[str]:
    """Plain lines on what the methods did: final σ per task (Bayesian losses), RLO's actions, final w_i."""
    last = records[-1]
    lines = []
    sigma = [k for k in last if k.startswith("loss/sigma/")]
    if sigma:
        first = records[0]
        shown = ", ".join(
            f"σ_{k.removeprefix('loss/sigma/')} {last[k]:.3f} (iteration {first['iter']}: {first.get(k, math.nan):.3f})"
            for k in sigma
        )
        lines.append(f"Bayesian losses, σ = exp(s/2) at iteration {last['iter']}: {shown}")
    if f"weighting/action_probability/{RLO_ACTIONS[0]}" in last:
        actions = [r["weighting/action"] for r in records if r.get("weighting/action", -1) >= 0]
        counts = ", ".join(f"{name} {actions.count(k)}" for k, name in enumerate(RLO_ACTIONS))
        probs = ", ".join(f"{name} {last[f'weighting/action_probability/{name}']:.2f}" for name in RLO_ACTIONS)
        lines.append(f"RLO: action in force at {len(actions)} of {len(records)} logged iterations: {counts}")
        lines.append(f"RLO: final action probabilities {probs}")
    if "level_weights" in last:
        weights = ", ".join(f"{n} {w:.2f}" for n, w in zip(last["level_names"], last["level_weights"], strict=False))
        lines.append(f"final level weights: {weights}")
    return lines


__all__ = ["field_families", "make_report", "methods_summary", "metrics_markdown"]
