"""Statistics over seeds for ``robustdet compare``: group runs by their config, mean ± std per group, and
the paired difference to a baseline group with a t confidence interval.

A group is every run whose resolved config (``config.yaml``) is the same once ``seed`` and the settings that
cannot change a result (logging, checkpoint period, worker and thread counts, cache folder) are left out.
With n seeds per group:

- mean ± std: the sample mean and the sample standard deviation (ddof = 1) of the n final values;
- paired difference to the baseline: d_i = x_i - b_i for each seed i that both groups ran (the seed fixes
  the initialisation and the data order, so the two runs of a seed share them), reported as the mean of
  d and its 95 % t interval, mean(d) ± t_{0.975, n-1} · std(d) / sqrt(n). The interval needs n >= 2.

Everything here is a pure function of ``Run`` records, so it can be tested on made-up metrics;
``load_run`` and ``expand_run_dirs`` are the only functions that read files.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from robustdet.errors import ConfigError
from robustdet.files import read_jsonl

# Settings that cannot change what a run learns or scores (data order does not depend on the worker count,
# evaluation saves and restores the random streams, docs/robustness.md): runs that differ only here are
# the same experiment.
IGNORED_KEYS: tuple[str, ...] = (
    "log.",
    "checkpoint.",
    "data.num_workers",
    "data.synthetic.cache_dir",
    "data.verify_images",
    "train.num_threads",
    "train.dist_timeout_s",
    "eval.period",
)
# Without --by and without a sweep's record of its grid, the compared factors are the methods.
DEFAULT_FACTORS: tuple[str, ...] = ("loss.", "weighting.")
DEFAULT_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
ABSENT = "<absent>"


@dataclass
class Run:
    """One finished run, as far as the statistics need it."""

    name: str
    seed: int
    config: dict[str, Any]  # flattened, dotted keys, without ``seed``
    metrics: dict[str, float]  # final COCO numbers (percent)
    sigmas: dict[str, float] = field(default_factory=dict)  # final σ = exp(s/2) per task
    labels: dict[str, str] | None = None  # the sweep's axis labels (cell.json), if it came from a sweep
    grid_keys: tuple[str, ...] = ()  # the dotted keys the sweep's grid sets
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # eval.jsonl: (iteration, bbox)
    path: Path | None = None


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
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _matches(key: str, patterns: Iterable[str]) -> bool:
    """``patterns`` hold exact keys, and prefixes ending with a dot (a whole section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in patterns)


def yaml_inline(value: Any) -> str:
    """``value`` as one line of YAML that reads back as the same value (``'20'`` for the string 20)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip()


def value_text(value: Any) -> str:
    """A config value as a label shows it: ``true``, ``avw``, ``[8, 16]`` (strings unquoted)."""
    return value if isinstance(value, str) else yaml_inline(value)


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without ``seed`` and the settings in IGNORED_KEYS."""
    flat = flatten(config)
    return {k: v for k, v in flat.items() if k != "seed" and not _matches(k, IGNORED_KEYS)}


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
        component_compared = section in _COMPONENT_KEYS and _matches(_COMPONENT_KEYS[section], factors)
        if not _matches(key, factors) and not (component_compared and follows_component(key, keys, configs)):
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
    then every group is compared with the selected group that has its other labels (its noise level, say).
    """
    chosen, keys = selected_groups(groups, selector)
    out: dict[str, Group | None] = {}
    for g in groups:
        if any(g is c for c in chosen):
            out[g.label] = None
        elif len(chosen) == 1:
            out[g.label] = chosen[0]
        else:
            fits = [c for c in chosen if all(c.labels.get(k) == v for k, v in g.labels.items() if k not in keys)]
            out[g.label] = fits[0] if len(fits) == 1 else None
    return out


# ---------------------------------------------------------------------------------------------- the tables
def sigma_names(groups: Sequence[Group]) -> list[str]:
    return [f"σ_{t}" for t in dict.fromkeys(t for g in groups for r in g.runs for t in r.sigmas)]


def _fmt(x: float, sign: bool = False) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


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


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Plain-text columns: the first ``left`` left-aligned (names), the rest right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(
            f"{c:<{w}}" if i < left else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

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


# ------------------------------------------------------------------------------------------------- reading
def final_sigmas(record: dict[str, Any]) -> dict[str, float]:
    """σ = exp(s/2) per task from a log.jsonl record: ``log_var_<task>`` or ``loss/log_var/<task>``."""
    out = {}
    for key, value in record.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue  # e.g. log_var_out_of_range, a dict
        for prefix in ("log_var_", "loss/log_var/"):
            if key.startswith(prefix):
                out[key.removeprefix(prefix)] = math.exp(float(value) / 2)
    return out


def last_log_record(path: Path) -> dict[str, Any]:
    """The last whole step record of a ``log.jsonl`` ({} when there is none)."""
    steps = [rec for rec in read_jsonl(path) if "event" not in rec]
    return steps[-1] if steps else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None


def load_run(run_dir: str | Path) -> Run:
    """A finished run directory (``config.yaml``, ``metrics.json``; ``log.jsonl``, ``eval.jsonl``, a sweep's
    ``cell.json`` where present)."""
    d = Path(run_dir)
    cfg_path, metrics_path = d / "config.yaml", d / "metrics.json"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path}: the run has no final metrics (did it finish?)")
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: the run has no config.yaml to group it by")
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: the top level must be a mapping")
    metrics = _read_json(metrics_path).get("bbox", {})
    evals = []
    eval_path = d / "eval.jsonl"
    if eval_path.exists():
        for line in eval_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                evals.append((int(rec["iter"]), rec["bbox"]))
    cell = _read_json(d / "cell.json") if (d / "cell.json").exists() else {}
    return Run(
        name=d.name,
        seed=int(config.get("seed", 0)),
        config=result_config(config),
        metrics={k: float(v) for k, v in metrics.items()},
        sigmas=final_sigmas(last_log_record(d / "log.jsonl")),
        labels=cell.get("labels"),
        grid_keys=tuple(cell.get("grid_keys", ())),
        evals=evals,
        path=d,
    )


def _summary_order(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["cell"]: i for i, row in enumerate(csv.DictReader(f)) if row.get("cell")}


def expand_run_dirs(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Run directories, with a sweep's output folder replaced by its finished cells (unfinished ones are
    listed in the notes); the same folder given twice counts once."""
    out: list[Path] = []
    notes: list[str] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such run directory")
        if (p / "config.yaml").exists() or (p / "metrics.json").exists():
            out.append(p)
            continue
        cells = sorted(c for c in p.iterdir() if c.is_dir() and (c / "cell.json").exists())
        order = _summary_order(p / "summary.csv")
        # the sweep's own order (its grid as written, baseline first), not the alphabet
        cells.sort(key=lambda c: order.get(c.name, len(order)))
        if not cells:
            raise FileNotFoundError(f"{p}: neither a run directory (config.yaml) nor a sweep's (cell folders)")
        for c in cells:
            if (c / "metrics.json").exists():
                out.append(c)
            else:
                notes.append(f"{c}: not finished, left out")
    unique = list({p.resolve(): p for p in out}.values())
    return unique, notes


__all__ = [
    "DEFAULT_METRICS",
    "IGNORED_KEYS",
    "Group",
    "PairedDifference",
    "Run",
    "baselines",
    "expand_run_dirs",
    "factor_keys",
    "final_sigmas",
    "format_differences",
    "format_groups",
    "group_runs",
    "load_run",
    "mean_std",
    "paired_difference",
    "t_interval",
    "unintended_differences",
]
