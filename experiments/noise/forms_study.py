"""Issue 16 §4: which Bayesian loss survives convergence? Reads the cells of ``experiments/noise/forms.yaml``
(the σ study's cell, log_var_lr 0.02, one row per candidate form) and the plain baseline of the same cell
(``robust.yaml``'s method=baseline, noise=clean), and writes ``OUT/forms.csv`` and ``OUT/forms.md``:

- per form, on clean labels: AP and AP50 at the default score threshold (the run's metrics.json), the final
  σ_cls and σ_reg, and the paired difference in AP50 to the baseline over the seeds both have, with its
  95 % t interval (the condition: mean ≥ −1);
- per form with jitter cells: σ_reg at each box-jitter level (seed 0; the clean cell is level 0) and
  Spearman's ρ between σ_reg and the level, with its exact permutation p (the condition: ρ ≥ 0.8).

    .venv/bin/python experiments/noise/forms_study.py runs/noise/forms runs/robust --out experiments/noise
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from robustdet.runs.reader import read_cell, read_final_sigmas, read_metrics

LEVELS = {"clean": 0.0, "jitter10": 0.1, "jitter20": 0.2, "jitter30": 0.3, "jitter40": 0.4}


def finished(root: Path) -> list[dict[str, Any]]:
    """Every finished cell under ``root``: its labels, seed, AP, AP50, σ_cls, σ_reg."""
    rows = []
    for cell in sorted(p for p in root.iterdir() if (p / "metrics.json").exists()):
        info = read_cell(cell)
        bbox = read_metrics(cell)["bbox"]
        sig = read_final_sigmas(cell)
        rows.append({**info.get("labels", {}), "seed": info.get("seed"), "AP": bbox["AP"], "AP50": bbox["AP50"],
                     "sigma_cls": sig.get("cls", math.nan), "sigma_reg": sig.get("reg", math.nan)})
    return rows


def paired(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of paired differences (nan interval below 2 pairs)."""
    m = float(np.mean(diffs)) if diffs else math.nan
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    return m, m - half, m + half


def permutation_rho(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's ρ and its exact two-sided permutation p (all orderings of y)."""
    rho = float(stats.spearmanr(x, y)[0])
    perms = [float(stats.spearmanr(x, p)[0]) for p in itertools.permutations(y)]
    return rho, sum(abs(r) >= abs(rho) - 1e-12 for r in perms) / len(perms)


def form_rows(forms: list[dict[str, Any]], base: dict[int, float]) -> list[dict[str, Any]]:
    out = []
    for form in dict.fromkeys(r["form"] for r in forms):
        clean = [r for r in forms if r["form"] == form and r["noise"] == "clean"]
        diffs = [r["AP50"] - base[r["seed"]] for r in clean if r["seed"] in base]
        mean, low, high = paired(diffs)
        jit = {LEVELS[r["noise"]]: r["sigma_reg"] for r in forms if r["form"] == form and r["seed"] == 0}
        rho, p = permutation_rho(list(jit), list(jit.values())) if len(jit) >= 3 else (math.nan, math.nan)
        out.append({
            "form": form, "seeds": len(clean), "AP": np.mean([r["AP"] for r in clean]),
            "AP_std": np.std([r["AP"] for r in clean], ddof=1) if len(clean) > 1 else math.nan,
            "AP50": np.mean([r["AP50"] for r in clean]),
            "AP50_std": np.std([r["AP50"] for r in clean], ddof=1) if len(clean) > 1 else math.nan,
            "sigma_cls": np.mean([r["sigma_cls"] for r in clean]),
            "sigma_reg": np.mean([r["sigma_reg"] for r in clean]),
            "dAP50": mean, "dAP50_low": low, "dAP50_high": high, "pairs": len(diffs),
            "sigma_reg_by_jitter": " ".join(f"{lv:.1f}:{s:.4f}" for lv, s in sorted(jit.items())),
            "rho_jitter": rho, "rho_p": p,
        })
    return out


def markdown(rows: list[dict[str, Any]], base: dict[int, float]) -> str:
    lines = [f"Plain baseline AP50 by seed: {', '.join(f'{s}: {v:.1f}' for s, v in sorted(base.items()))}", "",
             "| form | seeds | AP | AP50 | σ_cls | σ_reg | AP50 − baseline [95 % CI] | σ_reg by jitter (seed 0) "
             "| ρ (p) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"{r['dAP50']:+.1f} [{r['dAP50_low']:+.1f}, {r['dAP50_high']:+.1f}]" if r["pairs"] > 1 else (
            f"{r['dAP50']:+.1f} (1 pair)" if r["pairs"] else "")
        rho = f"{r['rho_jitter']:+.2f} ({r['rho_p']:.3f})" if not math.isnan(r["rho_jitter"]) else ""
        lines.append(f"| {r['form']} | {r['seeds']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['sigma_cls']:.3f} "
                     f"| {r['sigma_reg']:.4f} | {ci} | {r['sigma_reg_by_jitter']} | {rho} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("forms", type=Path, help="the forms.yaml sweep folder")
    ap.add_argument("baseline", type=Path, help="the robust.yaml sweep folder (method=baseline, noise=clean)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    base = {r["seed"]: r["AP50"] for r in finished(args.baseline)
            if r.get("method") == "baseline" and r.get("noise") == "clean"}
    rows = form_rows(finished(args.forms), base)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "forms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["form"])
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, base)
    (args.out / "forms.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
