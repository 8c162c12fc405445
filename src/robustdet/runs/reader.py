"""The one reader of run directories: ``config.yaml``, ``log.jsonl``, ``eval.jsonl``, ``metrics.json``, a
sweep cell's ``cell.json`` and a sweep's ``summary.csv``, for ``compare``, ``report``, ``sweep`` and the plots.

Old run directories read as new ones: log keys written before logging was generic (robustdet <= stop 7)
are renamed on reading (``upgrade_record``), so everything above sees one set of names. A file that
cannot be used is an error naming it (``ConfigError``, ``FileNotFoundError``: one line from the CLI).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from robustdet.errors import ConfigError
from robustdet.files import read_jsonl
from robustdet.runs.settings import result_config

if TYPE_CHECKING:
    from robustdet.config import Config


@dataclass
class Run:
    """One finished run, as far as the comparison needs it."""

    name: str
    seed: int
    config: dict[str, Any]  # flattened, dotted keys, without ``seed`` and the settings.IGNORED_KEYS
    metrics: dict[str, float]  # final COCO numbers (percent)
    sigmas: dict[str, float] = field(default_factory=dict)  # final σ = exp(s/2) per task
    labels: dict[str, str] | None = None  # the sweep's axis labels (cell.json), if it came from a sweep
    grid_keys: tuple[str, ...] = ()  # the dotted keys the sweep's grid sets
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # eval.jsonl: (iteration, bbox)
    path: Path | None = None


# ------------------------------------------------------------------------------------------------ the files
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as a plain mapping (``config.load_config`` validates one)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the run has no config.yaml")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return config


def run_config(run_dir: str | Path) -> Config:
    """The run's ``config.yaml`` loaded and validated as the run's ``Config`` (what it trained with)."""
    from robustdet.config import load_config  # here: the plain readers above need no models or datasets

    return load_config(Path(run_dir) / "config.yaml")


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The run's final ``metrics.json`` (``bbox``: the COCO numbers; ``per_class`` where written)."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the run has no final metrics (did it finish?)")
    return read_json(path)


# log keys written before logging was generic (robustdet <= stop 7), read as the generic names
RLO_ACTIONS = ("a0_avw", "a1_smallest_loss", "a2_largest_loss", "a3_equal")


def upgrade_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A ``log.jsonl`` record with the old RLO and log-variance keys renamed to the generic ones."""
    out = dict(rec)
    if "rlo_probabilities" in out:
        for name, p in zip(RLO_ACTIONS, out.pop("rlo_probabilities"), strict=True):
            out[f"weighting/action_probability/{name}"] = p
    if "rlo_action" in out:
        action = out.pop("rlo_action")
        out["weighting/action"] = -1 if action is None else action
    for key in [k for k in out if k.startswith("log_var_") and isinstance(out[k], float)]:
        task = key.removeprefix("log_var_")
        s = out.pop(key)
        out[f"loss/log_var/{task}"] = s
        out[f"loss/sigma/{task}"] = math.exp(s / 2)
    if "rpn_cls" in out and "extra_level_names" not in out:
        out["extra_level_names"] = [f"P{k + 2}" for k in range(len(out["rpn_cls"]))]
    return out


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's ``log.jsonl`` step records ([] without one), old keys upgraded (:func:`upgrade_record`)."""
    return [upgrade_record(r) for r in read_jsonl(Path(run_dir) / "log.jsonl") if "event" not in r]


def final_sigmas(record: dict[str, Any]) -> dict[str, float]:
    """σ = exp(s/2) per task from a log.jsonl record: ``loss/log_var/<task>`` (or the old ``log_var_<task>``)."""
    out = {}
    for key, value in record.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue  # e.g. log_var_out_of_range, a dict
        for prefix in ("log_var_", "loss/log_var/"):
            if key.startswith(prefix):
                out[key.removeprefix(prefix)] = math.exp(float(value) / 2)
    return out


def read_final_sigmas(run_dir: str | Path) -> dict[str, float]:
    """The final σ per task of a Bayesian run ({} for plain losses or without a log)."""
    steps = read_jsonl(Path(run_dir) / "log.jsonl")
    steps = [r for r in steps if "event" not in r]
    return final_sigmas(steps[-1]) if steps else {}


def read_evals(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluations during training (``eval.jsonl``: ``iter`` and the COCO numbers ``bbox``)."""
    return [r for r in read_jsonl(Path(run_dir) / "eval.jsonl") if "bbox" in r]


def read_detections(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The final evaluation's detections (``detections.json``, COCO results), or None when absent."""
    path = Path(run_dir) / "detections.json"
    return read_json(path) if path.exists() else None


def read_cell(run_dir: str | Path) -> dict[str, Any]:
    """A sweep cell's ``cell.json`` ({} when the run is no cell, or the file was cut by a kill: the sweep
    rewrites it when the cell runs)."""
    path = Path(run_dir) / "cell.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def read_machine(run_dir: str | Path) -> str:
    """The machine(s) the run trained on, one line ("AMD EPYC 7B13, 1 threads, torch 2.14.1"; the distinct
    starts joined by " + "), from ``machine.json`` (engine/machine.py); "" for a run that has none."""
    try:
        starts = json.loads((Path(run_dir) / "machine.json").read_text()).get("starts", [])
    except (OSError, ValueError, AttributeError):
        return ""
    labels: list[str] = []
    for s in starts:
        text = f"{s.get('gpu') or s.get('cpu', '?')}, {s.get('threads', '?')} threads, torch {s.get('torch', '?')}"
        if text not in labels:
            labels.append(text)
    return " + ".join(labels)


# ------------------------------------------------------------------------------------------------ the runs
def load_run(run_dir: str | Path) -> Run:
    """A finished run directory (``config.yaml``, ``metrics.json``; ``log.jsonl``, ``eval.jsonl``, a sweep's
    ``cell.json`` where present)."""
    d = Path(run_dir)
    metrics = read_metrics(d).get("bbox", {})
    config = read_config(d)
    cell = read_cell(d)
    return Run(
        name=d.name,
        seed=int(config.get("seed", 0)),
        config=result_config(config),
        metrics={k: float(v) for k, v in metrics.items()},
        sigmas=read_final_sigmas(d),
        labels=cell.get("labels"),
        grid_keys=tuple(cell.get("grid_keys", ())),
        evals=[(int(r["iter"]), r["bbox"]) for r in read_evals(d)],
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
    "RLO_ACTIONS",
    "Run",
    "expand_run_dirs",
    "final_sigmas",
    "load_run",
    "read_cell",
    "read_config",
    "read_detections",
    "read_evals",
    "read_final_sigmas",
    "read_json",
    "read_log",
    "read_metrics",
    "run_config",
    "upgrade_record",
]
