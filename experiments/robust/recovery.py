"""Issue 17's goal table from a sweep's summary.csv: for each kind of noise and level, the AP the baseline
loses to it, and for each method the share of it won back, with its paired 95 % interval and its cost on
clean labels.

    .venv/bin/python experiments/robust/recovery.py experiments/robust/summary.csv

For method m at noise level k (e.g. flip40) and seed s, d(s) = AP(m, k, s) − AP(baseline, k, s); the loss
of the baseline is L = mean_s [AP(baseline, clean, s) − AP(baseline, k, s)]; the recovery is mean d / L, its
interval the t interval of d over the seeds divided by L (L taken as known). The clean cost is the mean of
AP(m, clean, s) − AP(baseline, clean, s). The goal (issue 17): recovery >= 40 %, interval above 0, cost at
most 1 AP. Pairs are formed only within a machine when summary.csv has a ``machine`` column (the numbers
differ between CPU kinds, issue 17 §2).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

from scipy import stats

GOAL_RECOVERY = 0.40
GOAL_CLEAN_COST = 1.0


def read_ap(path: Path) -> dict[tuple[str, str, str], tuple[float, str]]:
    """(method, noise, seed) → (AP, machine) of the finished cells."""
    out = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("status") == "done" and row.get("AP"):
                out[(row["method"], row["noise"], row["seed"])] = (float(row["AP"]), row.get("machine", ""))
    return out


def paired(ap: dict, a: tuple[str, str], b: tuple[str, str]) -> list[float]:
    """AP(a) − AP(b) per seed, over the seeds both have (on the same machine)."""
    diffs = []
    for (m, n, s), (value, machine) in sorted(ap.items()):
        other = ap.get((*b, s))
        if (m, n) == a and other is not None and other[1] == machine:
            diffs.append(value - other[0])
    return diffs


def mean_interval(d: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval (NaN bounds for fewer than two values)."""
    m = statistics.fmean(d)
    if len(d) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half


def table(ap: dict) -> list[str]:
    methods = sorted({m for m, _, _ in ap} - {"baseline"})
    levels = sorted({n for _, n, _ in ap} - {"clean"})
    lines = [
        f"{'noise':<10} {'baseline loss':>13} {'method':<24} {'n':>2} {'ΔAP [95% t]':>24} "
        f"{'recovery [95%]':>22} {'clean cost':>10}  goal",
    ]
    for level in levels:
        loss_d = paired(ap, ("baseline", "clean"), ("baseline", level))
        if not loss_d:
            continue
        loss = statistics.fmean(loss_d)
        for method in methods:
            d = paired(ap, (method, level), ("baseline", level))
            if not d:
                continue
            mean, lo, hi = mean_interval(d)
            cost_d = paired(ap, (method, "clean"), ("baseline", "clean"))
            cost = -statistics.fmean(cost_d) if cost_d else math.nan
            rec = mean / loss if loss > 0 else math.nan
            met = rec >= GOAL_RECOVERY and lo > 0 and cost <= GOAL_CLEAN_COST
            short = "met" if met else f"no (recovery short by {max(0.0, GOAL_RECOVERY - rec) * 100:.1f} pts)"
            lines.append(
                f"{level:<10} {loss:>13.2f} {method:<24} {len(d):>2} {mean:>+7.2f} [{lo:+.2f}, {hi:+.2f}]"
                f"{'':>2} {rec * 100:>+6.1f} % [{lo / loss * 100:+.0f}, {hi / loss * 100:+.0f}]"
                f" {cost:>10.2f}  {short}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path)
    args = parser.parse_args()
    ap = read_ap(args.summary)
    print(f"{len(ap)} finished cells; AP in points; clean cost = baseline − method on clean labels")
    print("\n".join(table(ap)))


if __name__ == "__main__":
    main()
