"""Statistics over seeds for ``robustdet compare``: group runs by their config, mean ± std per group, and
the paired difference to a baseline group with a t confidence interval.

A group is every run whose resolved config (``config.yaml``) is the same once ``seed`` and the settings that
cannot change a result (logging, checkpoint period, worker and thread counts, cache folder) are left out.
With n seeds per group:

- mean ± std: the sample mean and the sample standard deviation (ddof = 1) of the n final values;
- paired difference to the baseline: d_i = x_i - b_i for each seed i that both groups ran (the seed fixes
  the initialisation and the data order, so the two runs of a seed share them), reported as the mean of
  d and its 95 % t interval, mean(d) ± t_{0.975, n-1} · std(d) / sqrt(n). The interval needs n >= 2.

Everything here is a pure function of ``Run`` records (``runs/reader.py`` reads them), so it can be tested
on made-up metrics. The tables are written here and nowhere else: one row per run (``format_runs``), one per
group of seeds (``format_groups``), and the paired differences (``format_differences``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from robustdet.errors import ConfigError
from robustdet.runs.reader import Run
from robustdet.runs.settings import matches, value_text

# Without --by and without a sweep's record of its grid, the compared factors are the methods.
DEFAULT_FACTORS: tuple[str, ...] = ("loss.", "weighting.")
DEFAULT_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
ABSENT = "<absent>"


@dataclass
class Group:
    label: str
    labels: dict[str, str]
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def values(self, metric: str) -> dict[int, float]:
        """Seed -> final value; ``metric`` is a COCO name or ``σ_<task>``."""
        out = {}
        for r in self.runs:
            v = r.sigmas.get(metric[2:]) if metric.startswith("σ_") else r.metrics.get(metric)
            if v is not None:
                out[r.seed] = float(v)
        return out


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    std: float
    n: int
    low: float
    high: float


# --------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and sample standard deviation (ddof = 1; NaN for fewer than two values)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The t confidence interval of the mean, mean ± t_{(1+c)/2, n-1} · std / sqrt(n) (NaN for n < 2)."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def paired_difference(
    values: dict[int, float], baseline: dict[int, float], confidence: float = 0.95
) -> PairedDifference:
    """Mean of d_seed = values[seed] - baseline[seed] over the seeds both have, with its t interval."""
    seeds = sorted(set(values) & set(baseline))
    d = [values[s] - baseline[s] for s in seeds]
    mean, std = mean_std(d)
    low, high = t_interval(d, confidence)
    return PairedDifference(mean=mean, std=std, n=len(d), low=low, high=high)


# ------------------------------------------------------------------------------------------------ grouping
def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Keys (in first-seen order) whose value is not the same in all ``configs`` (a missing key counts)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if len({json.dumps(c.get(k, ABSENT), sort_keys=True) for c in configs}) > 1]


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs with the same config (``Run.config``: seed and IGNORED_KEYS already left out), in first-seen order.

    Groups are labelled by the sweep's axis labels when every run has them and they tell the groups apart,
    else by the config keys in which the groups differ (``loss.bayesian=true weighting.name=rlo``).
    """
    buckets: dict[str, list[Run]] = {}
    for run in runs:
        buckets.setdefault(json.dumps(run.config, sort_keys=True), []).append(run)
    members = list(buckets.values())
    for group in members:
        seen: dict[int, str] = {}
        for r in group:
            if r.seed in seen:
                raise ConfigError(
                    f"{seen[r.seed]} and {r.name}: the same config and seed {r.seed} twice; a group holds one "
                    "run per seed (pass one of them)"
                )
            seen[r.seed] = r.name
    labels = _axis_labels(members) or _config_labels(members)
    return [
        Group(label=" ".join(f"{k}={v}" for k, v in lab.items()) or _single_label(g), labels=lab, runs=g)
        for g, lab in zip(members, labels, strict=True)
    ]


def _axis_labels(members: list[list[Run]]) -> list[dict[str, str]] | None:
    per_group = []
    for group in members:
        labs = [r.labels for r in group]
        if any(lab is None for lab in labs) or any(lab != labs[0] for lab in labs):
            return None
        per_group.append(labs[0])
    axes = list(dict.fromkeys(k for lab in per_group for k in lab))  # type: ignore[union-attr]
    varying = [a for a in axes if len({lab.get(a, ABSENT) for lab in per_group}) > 1]  # type: ignore[union-attr]
    out = [{a: lab.get(a, ABSENT) for a in varying} for lab in per_group]  # type: ignore[union-attr]
    if len({json.dumps(o, sort_keys=True) for o in out}) < len(out):
        return None  # e.g. two sweeps with the same grid over different base configs
    return out


# sections that are one component each, keyed on the component's name: their other keys come with it
_COMPONENT_KEYS = {"model.": "model.name", "weighting.": "weighting.name"}


def follows_component(key: str, keys: Sequence[str], configs: Sequence[dict[str, Any]]) -> bool:
    """Whether ``key`` (a component's own setting, e.g. ``weighting.interval``) only comes and goes with the
    component (equal has none, avw its defaults): its value is the same in every config of one component,
    and the component's name is among the differing ``keys``."""
    prefix = next((p for p in _COMPONENT_KEYS if key.startswith(p)), None)
    if prefix is None or key == _COMPONENT_KEYS[prefix] or _COMPONENT_KEYS[prefix] not in keys:
        return False
    values: dict[str, set[str]] = {}
    for c in configs:
        values.setdefault(json.dumps(c.get(_COMPONENT_KEYS[prefix])), set()).add(
            json.dumps(c.get(key, ABSENT), sort_keys=True)
        )
    return all(len(v) == 1 for v in values.values())


def _config_labels(members: list[list[Run]]) -> list[dict[str, str]]:
    """The config keys in which the groups differ, without the component settings that follow the
    component (:func:`follows_component`)."""
    configs = [g[0].config for g in members]
    keys = differing_keys(configs)
    keys = [k for k in keys if not follows_component(k, keys, configs)]
    return [{k: value_text(c.get(k, ABSENT)) for k in keys} for c in configs]


def _single_label(runs: list[Run]) -> str:
    return runs[0].name if len(runs) == 1 else "all runs"


def factor_keys(runs: Sequence[Run], by: Sequence[str] | None = None) -> tuple[str, ...]:
    """The keys the comparison is about: ``by`` if given, else the sweeps' grid keys, else DEFAULT_FACTORS."""
    if by:
        return tuple(by)
    grid = tuple(dict.fromkeys(k for r in runs for k in r.grid_keys))
    return grid or DEFAULT_FACTORS


def unintended_differences(groups: Sequence[Group], factors: Sequence[str]) -> dict[str, list[str]]:
    """Config keys, outside ``factors``, in which the groups differ, with the values seen (e.g. data, schedule,
    iterations): a difference in them would be read as the effect of the factors."""
    configs = [g.runs[0].config for g in groups]
    out = {}
    keys = differing_keys(configs)
    for key in keys:
        # a compared component's own settings come with it (interval with avw, none with equal)
        section = key.split(".")[0] + "."
        component_compared = section in _COMPONENT_KEYS and matches(_COMPONENT_KEYS[section], factors)
        if not matches(key, factors) and not (component_compared and follows_component(key, keys, configs)):
            out[key] = list(dict.fromkeys(value_text(c.get(key, ABSENT)) for c in configs))
    return out


# ------------------------------------------------------------------------------------------------ baseline
def _parse_selector(selector: str) -> dict[str, str]:
    pairs = {}
    for item in selector.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            return {}
        pairs[key] = value
    return pairs


def selected_groups(groups: Sequence[Group], selector: str) -> tuple[list[Group], set[str]]:
    """The groups ``selector`` names (a group label, a run's folder or name, or some labels: ``method=baseline``)
    and the label keys it fixes (none for a label or a run: it names one group)."""
    chosen = [g for g in groups if g.label == selector]
    if chosen:
        return chosen, set()
    path = Path(selector)
    chosen = [
        g for g in groups
        if any(r.name == selector or (r.path is not None and path.exists() and r.path.resolve() == path.resolve())
               for r in g.runs)
    ]
    if chosen:
        return chosen[:1], set()
    pairs = _parse_selector(selector)
    chosen = [g for g in groups if pairs and all(g.labels.get(k) == v for k, v in pairs.items())]
    if not chosen:
        known = "; ".join(g.label for g in groups)
        raise ConfigError(f"--baseline {selector!r}: no group or run by that name (the groups: {known})")
    return chosen, set(pairs)


def baselines(groups: Sequence[Group], selector: str) -> dict[str, Group | None]:
    """Each group's baseline group (None for a baseline itself, or where none fits).

    ``selector`` names one group (its label, or one of its runs), or some of the labels (``method=baseline``):
    then every group is compared with the selected group that has its other labels (its noise level, say),
    and a group with no such baseline gets none, also when only one baseline group exists.
    """
    chosen, keys = selected_groups(groups, selector)
    out: dict[str, Group | None] = {}
    for g in groups:
        if any(g is c for c in chosen):
            out[g.label] = None
        elif len(chosen) == 1 and not keys:  # one group named: everyone's baseline
            out[g.label] = chosen[0]
        else:
            fits = [c for c in chosen if all(c.labels.get(k) == v for k, v in g.labels.items() if k not in keys)]
            out[g.label] = fits[0] if len(fits) == 1 else None
    return out


# ---------------------------------------------------------------------------------------------- the tables
def sigma_names(groups: Sequence[Group]) -> list[str]:
    return [f"σ_{t}" for t in dict.fromkeys(t for g in groups for r in g.runs for t in r.sigmas)]


def _fmt(x: float, sign: bool = False, digits: int = 2) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_groups(groups: Sequence[Group], metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """One row per group: the number of seeds, and mean ± std over seeds of each metric and final σ."""
    cols = [*metrics, *sigma_names(groups)]
    rows = []
    for g in groups:
        cells = []
        for m in cols:
            vals = list(g.values(m).values())
            mean, std = mean_std(vals)
            # one seed has no spread to show: the value alone, not "± nan"
            cells.append("-" if not vals else _fmt(mean) if len(vals) == 1 else f"{_fmt(mean)} ± {_fmt(std)}")
        rows.append((g.label, str(len(g.runs)), ",".join(map(str, g.seeds)), cells))
    return _table(["group", "n", "seeds", *cols], [[a, b, c, *d] for a, b, c, d in rows])


def format_differences(
    groups: Sequence[Group], base: dict[str, Group | None], metrics: Sequence[str] = DEFAULT_METRICS,
    confidence: float = 0.95,
) -> str:
    """One row per compared group: mean paired difference to its baseline [t interval] over common seeds."""
    rows = []
    for g in groups:
        b = base.get(g.label)
        if b is None:
            continue
        cells = []
        n = 0
        for m in metrics:
            d = paired_difference(g.values(m), b.values(m), confidence)
            n = d.n
            if not d.n:
                cells.append("-")
            elif d.n == 1:  # no interval from one pair
                cells.append(f"{_fmt(d.mean, True)} (one seed)")
            else:
                cells.append(f"{_fmt(d.mean, True)} [{_fmt(d.low, True)}, {_fmt(d.high, True)}]")
        rows.append([g.label, b.label, str(n), *cells])
    if not rows:
        return "(no group has a baseline to compare with)"
    return _table(["group", "baseline", "n", *metrics], rows, left=2)


def format_runs(runs: Sequence[Run], metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """One row per run, side by side: its final metrics, and its final σ per task where Bayesian (``notes``)."""
    rows = []
    for r in runs:
        cells = [_fmt(r.metrics[m], digits=1) if m in r.metrics else "-" for m in metrics]
        rows.append([r.name, *cells, " ".join(f"σ_{t}={s:.3f}" for t, s in r.sigmas.items())])
    return _table(["run", *metrics, "notes"], rows, last_left=True)


def _table(head: list[str], rows: list[list[str]], left: int = 1, last_left: bool = False) -> str:
    """Plain-text columns: the first ``left`` left-aligned (names), the rest right-aligned (numbers) but for
    the last with ``last_left`` (notes)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    ends = len(head) - 1 if last_left else len(head)

    def line(r: list[str]) -> str:
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(f"{c:<{w}}" if i < left or i >= ends else f"{c:>{w}}" for i, (c, w) in cells).rstrip()

    return "\n".join([line(head), "-" * len(line(head)), *map(line, rows)])


def unpaired_seeds(groups: Sequence[Group], base: dict[str, Group | None]) -> list[str]:
    """Notes on seeds a group or its baseline ran alone (they are left out of the paired difference)."""
    notes = []
    for g in groups:
        b = base.get(g.label)
        if b is None:
            continue
        alone = sorted(set(g.seeds) ^ set(b.seeds))
        if alone:
            notes.append(f"{g.label} vs {b.label}: seeds {alone} are in only one of them and not paired")
    return notes


# ---------------------------------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    groups: list[Group]
    base: dict[str, Group | None] | None
    metrics: list[str]
    factors: tuple[str, ...]
    warnings: list[str]
    notes: list[str]
    confidence: float = 0.95

    @property
    def replicated(self) -> bool:
        """Some group has more than one seed: there is something to average."""
        return any(len(g.runs) > 1 for g in self.groups)

    def text(self) -> str:
        out = ["mean ± std over seeds (std with ddof=1), per group of runs that differ only in the seed:",
               format_groups(self.groups, self.metrics)]
        if self.base is not None:
            out += ["", f"paired difference to the baseline (same seed), mean [{self.confidence:.0%} t interval]:",
                    format_differences(self.groups, self.base, self.metrics, self.confidence)]
        if self.notes:
            out += ["", *(f"note: {n}" for n in self.notes)]
        return "\n".join(out)


def build_comparison(
    runs: Sequence[Run], baseline: str | None = None, by: Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS, notes: Sequence[str] = (),
) -> Comparison:
    """Group ``runs``, pick the baselines, and collect the warnings (differences outside the factors)."""
    unique = list({(r.path.resolve() if r.path else r.name): r for r in runs}.values())
    groups = group_runs(unique)
    factors = factor_keys(unique, by)
    warnings = []
    extra = unintended_differences(groups, factors)
    if extra:
        shown = "; ".join(f"{k} ({' / '.join(v)})" for k, v in extra.items())
        warnings.append(
            f"the runs differ in more than {', '.join(factors)} and the seed: {shown}; their differences are not "
            "the effect of the compared settings alone (--by KEY,... names the keys the comparison is about)"
        )
    base = baselines(groups, baseline) if baseline else None
    all_notes = list(notes)
    if base is not None:
        all_notes += unpaired_seeds(groups, base)
        chosen = {g.label for g in selected_groups(groups, baseline)[0]}
        all_notes += [f"{label}: no baseline group with its other labels" for label, b in base.items()
                      if b is None and label not in chosen]
    return Comparison(groups=groups, base=base, metrics=list(metrics), factors=factors, warnings=warnings,
                      notes=all_notes)


__all__ = [
    "DEFAULT_METRICS",
    "Comparison",
    "Group",
    "PairedDifference",
    "baselines",
    "build_comparison",
    "factor_keys",
    "format_differences",
    "format_groups",
    "format_runs",
    "group_runs",
    "mean_std",
    "paired_difference",
    "t_interval",
    "unintended_differences",
]
