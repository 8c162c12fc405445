"""``robustdet sweep``: the Cartesian product of a grid of settings and seeds, one run directory per cell.

A sweep is a base config, overrides for every cell, seeds, and axes; each axis has levels, and each level
a label and the dotted overrides it sets (``method: {avw: {loss.bayesian: false, weighting.name: avw}}``,
or ``weighting.interval: [50, 100]`` for one key). The cells run one after another in this process with
``Trainer``, each into ``OUT/<axis>=<label>__...__seed=<s>``, and ``OUT/summary.csv`` gains a row as each
finishes. Running the same sweep again skips finished cells (``metrics.json``), resumes interrupted ones
exactly from their checkpoints, and refuses a cell folder whose config differs from the sweep's.
See docs/experiments.md.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import itertools
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from robustdet.compare import final_sigmas, last_log_record, result_config, value_text, yaml_inline
from robustdet.config import Config, load_config
from robustdet.engine.evaluator import METRIC_NAMES
from robustdet.errors import ConfigError
from robustdet.files import write_json_atomic, write_text_atomic

SWEEP_KEYS = ("config", "overrides", "seeds", "grid")


@dataclass
class Axis:
    name: str
    levels: list[tuple[str, dict[str, Any]]]  # (label, dotted key -> value)

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for _, o in self.levels for k in o))


@dataclass
class SweepSpec:
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, for every cell
    seeds: list[int] | None = None  # None: the config's own seed
    axes: list[Axis] = field(default_factory=list)
    source: str = "sweep"


@dataclass
class Cell:
    name: str
    labels: dict[str, str]
    seed: int
    overrides: list[str]  # KEY=VALUE, as ``robustdet train`` would take them
    cfg: Config


# --------------------------------------------------------------------------------------------- the spec
def override_text(key: str, value: Any) -> str:
    """``key=value`` with the value written so that ``parse_overrides`` (YAML) reads back the same value."""
    return f"{key}={yaml_inline(value)}"


def split_values(text: str) -> list[str]:
    """``"a,[1, 2],{x: 1}"`` -> ``["a", "[1, 2]", "{x: 1}"]``: commas inside brackets do not split."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_grid_arg(text: str) -> Axis:
    """``--grid KEY=V1,V2``: one axis named KEY, its values parsed as YAML scalars like override values."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")) or not raw.strip():
        raise ConfigError(f"--grid {text!r} is not of the form KEY=V1,V2 (e.g. weighting.name=avw,rlo)")
    levels = []
    for item in split_values(raw):
        if not item:
            raise ConfigError(f"--grid {text!r}: an empty value")
        try:
            value = yaml.safe_load(item)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {text!r}: {item!r} is not valid YAML ({exc})") from None
        levels.append((item, {key: value}))
    return Axis(key, levels)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: not a comma-separated list of integers (e.g. 0,1,2)") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seeds")
    return seeds


def is_sweep_file(path: str | Path) -> bool:
    """A sweep file has a ``grid`` or ``config`` key; a run config never does (unknown keys are errors)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and ("grid" in data or "config" in data)


def _dotted_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{where}: must be a mapping of dotted keys to values (e.g. {{weighting.name: avw}})")
    return dict(value)


def load_sweep_file(path: str | Path) -> SweepSpec:
    """Read a sweep YAML: ``{config, overrides, seeds, grid}``; ``config`` is relative to the sweep file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with {', '.join(SWEEP_KEYS)}")
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (a sweep file holds {', '.join(SWEEP_KEYS)})")
    if not isinstance(data.get("config"), str):
        raise ConfigError(f"{path}: config: missing or not a path (the run config every cell starts from)")
    config = path.parent / data["config"]
    if not config.is_file():
        raise ConfigError(f"{path}: config: {config} does not exist (the path is relative to the sweep file)")
    seeds = data.get("seeds")
    if seeds is not None:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds
        ):
            raise ConfigError(f"{path}: seeds: must be a list of integers (e.g. [0, 1, 2])")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid: must map each axis to its levels")
    axes = []
    for name, levels in grid.items():
        where = f"{path}: grid.{name}"
        if isinstance(levels, list):
            if not levels:
                raise ConfigError(f"{where}: no values")
            axes.append(Axis(str(name), [(value_text(v), {str(name): v}) for v in levels]))
        elif isinstance(levels, dict) and levels:
            mapped = [(str(lab), _dotted_mapping(o, f"{where}.{lab}")) for lab, o in levels.items()]
            axes.append(Axis(str(name), mapped))
        else:
            raise ConfigError(
                f"{where}: must be a list of values of the key {name!r}, or a mapping of labels to dotted overrides"
            )
    return SweepSpec(
        config=config,
        overrides=_dotted_mapping(data.get("overrides"), f"{path}: overrides"),
        seeds=seeds,
        axes=axes,
        source=str(path),
    )


def spec_from_args(config: str, overrides: list[str], grid: list[str], seeds: str | None) -> SweepSpec:
    """``robustdet sweep CONFIG [KEY=VALUE ...] --grid KEY=V1,V2 ... --seeds 0,1,2``: CONFIG is a run config
    or a sweep file; the command line's overrides, axes and seeds go on top of a sweep file's."""
    spec = load_sweep_file(config) if is_sweep_file(config) else SweepSpec(config=Path(config))
    if not spec.config.is_file():
        raise FileNotFoundError(f"{spec.config}: no such config file")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE (e.g. train.max_iter=200)")
        try:
            spec.overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
    spec.axes += [parse_grid_arg(g) for g in grid]
    if seeds is not None:
        spec.seeds = parse_seeds(seeds)
    return spec


# -------------------------------------------------------------------------------------------- the cells
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_name(text: str) -> str:
    """``text`` as one path component: runs of other characters than ``A-Za-z0-9._+=-`` become ``_``."""
    return _UNSAFE.sub("_", text).strip("._") or "_"


def _check_keys(spec: SweepSpec) -> None:
    owner: dict[str, str] = {}
    for axis in spec.axes:
        if axis.name == "seed":
            raise ConfigError(f"{spec.source}: grid axis 'seed': the seeds are their own list (seeds / --seeds)")
        for key in axis.keys:
            if key == "seed":
                raise ConfigError(f"{spec.source}: grid.{axis.name} sets 'seed'; give the seeds as seeds / --seeds")
            if key in owner:
                raise ConfigError(f"{spec.source}: grid axes {owner[key]!r} and {axis.name!r} both set {key}")
            owner[key] = axis.name
    if spec.seeds is not None and "seed" in spec.overrides:
        raise ConfigError(f"{spec.source}: overrides set 'seed' and seeds are given too; keep one")


def build_cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the product, seeds outermost (a sweep cut short has every setting for its first seeds),
    each config loaded and validated now, so that a bad cell stops the sweep before anything trains."""
    _check_keys(spec)
    base = [override_text(k, v) for k, v in spec.overrides.items()]
    seeds: list[int | None] = list(spec.seeds) if spec.seeds is not None else [None]
    cells: list[Cell] = []
    names: dict[str, dict[str, str]] = {}
    for seed in seeds:
        for levels in itertools.product(*(axis.levels for axis in spec.axes)):
            labels = {axis.name: lab for axis, (lab, _) in zip(spec.axes, levels, strict=True)}
            cell = [override_text(k, v) for _, o in levels for k, v in o.items()]
            if seed is not None:
                cell.append(f"seed={seed}")
            overrides = base + cell
            try:
                # the cell's own keys over the common ones: a cell that switches the weighting drops the
                # common keys the new one does not take (config.merge_dicts)
                cfg = load_config(spec.config, base, layers=[cell])
            except ConfigError as exc:
                where = " ".join(f"{k}={v}" for k, v in labels.items()) or "the cell"
                raise ConfigError(f"cell {where}: {exc}") from None
            parts = [*(f"{a}={lab}" for a, lab in labels.items()), f"seed={cfg.seed}"]
            name = "__".join(safe_name(p) for p in parts)
            if name in names:
                raise ConfigError(
                    f"{spec.source}: the cells {names[name]} and {labels} get the same folder name {name!r} "
                    "(labels that differ only in characters a folder name cannot hold)"
                )
            names[name] = labels
            cells.append(Cell(name=name, labels=labels, seed=cfg.seed, overrides=overrides, cfg=cfg))
    return cells


def select_cells(cells: list[Cell], spec: SweepSpec, only: list[str]) -> list[Cell]:
    """``--only AXIS=L1,L2`` (repeatable): the cells whose label on each named axis is one of those given.

    The other cells keep their place in the sweep (``summary.csv`` lists every finished cell), so a subset
    run first and the whole sweep later train each cell once.
    """
    wanted: dict[str, set[str]] = {}
    axes = {a.name: [lab for lab, _ in a.levels] for a in spec.axes}
    for item in only:
        name, sep, raw = item.partition("=")
        if not sep or name not in axes:
            raise ConfigError(f"--only {item!r}: not AXIS=LABEL[,LABEL] with an axis of the sweep ({', '.join(axes)})")
        labels = split_values(raw)
        unknown = [lab for lab in labels if lab not in axes[name]]
        if unknown:
            raise ConfigError(f"--only {item!r}: {unknown[0]!r} is not a level of {name} ({', '.join(axes[name])})")
        wanted.setdefault(name, set()).update(labels)
    return [c for c in cells if all(c.labels[k] in v for k, v in wanted.items())]


# ------------------------------------------------------------------------------------------------ running
def cell_state(cell_dir: Path) -> str:
    """``done`` (metrics.json), ``diverged`` (an earlier sweep recorded it), ``resume`` (a checkpoint) or ``new``."""
    if (cell_dir / "metrics.json").exists():
        return "done"
    info = _cell_info(cell_dir)
    if info.get("status") == "diverged":
        return "diverged"
    ckpts = cell_dir / "checkpoints"
    # prev.pt alone: a kill in the middle of replacing last.pt (the trainer's --resume falls back to it)
    if (ckpts / "last.pt").exists() or (ckpts / "prev.pt").exists():
        return "resume"
    return "new"


def _cell_info(cell_dir: Path) -> dict[str, Any]:
    path = cell_dir / "cell.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # cut by a kill: rewritten when the cell runs


@contextlib.contextmanager
def claimed(cell_dir: Path) -> Iterator[bool]:
    """Hold the cell for this process while the block runs; yields False when another process holds it.

    An exclusive ``flock`` on ``cell_dir/.claim``: several sweep processes on one directory (``--jobs N``,
    or one per terminal) each train the next cell nobody holds, never the same one. The kernel drops the
    lock when its process ends, however it ends, so a killed sweep leaves no stale claim to clean up.
    """
    cell_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cell_dir / ".claim", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())  # who holds it, for a person
        yield True
    finally:
        os.close(fd)  # releases the lock


def check_cell_config(cell: Cell, cell_dir: Path) -> None:
    """A cell folder that holds a run must hold this cell's run: skipping or resuming another config would
    put its numbers under this cell's labels."""
    path = cell_dir / "config.yaml"
    if not path.exists():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML; delete the cell folder to run it again") from None
    new = cell.cfg.model_dump(mode="json")
    old_flat, new_flat = result_config(old), result_config(new)
    if old.get("seed") != new.get("seed"):
        old_flat["seed"], new_flat["seed"] = old.get("seed"), new.get("seed")
    diff = [k for k in dict.fromkeys([*old_flat, *new_flat]) if old_flat.get(k) != new_flat.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{path}: this cell's folder holds a run with another config ({k}: {old_flat.get(k)!r} there, "
            f"{new_flat.get(k)!r} in the sweep{f', and {len(diff) - 1} more keys' if len(diff) > 1 else ''}); "
            "use another --out or delete the folder"
        )


def grid_keys(spec: SweepSpec) -> list[str]:
    return list(dict.fromkeys(k for axis in spec.axes for k in axis.keys))


def plan_text(spec: SweepSpec, cells: list[Cell], out: Path) -> str:
    """What ``--dry-run`` prints: the levels, each cell with its state and iterations, the totals."""
    lines = []
    for axis in spec.axes:
        for lab, o in axis.levels:
            sets = " ".join(override_text(k, v) for k, v in o.items()) or "(the config as it is)"
            lines.append(f"  {axis.name}={lab}: {sets}")
    if lines:
        lines.insert(0, "levels:")
    states = [cell_state(out / c.name) for c in cells]
    width = max(len(c.name) for c in cells)
    lines.append("cells:")
    for c, st in zip(cells, states, strict=True):
        length = (
            f"{c.cfg.train.max_iter:>8} iterations"
            if c.cfg.train.max_iter is not None
            else f"{c.cfg.train.max_epochs:>8g} epochs"  # iterations known once the data is read
        )
        lines.append(f"  {c.name:<{width}}  {length}  [{st}]")
    total = sum(c.cfg.train.max_iter or 0 for c in cells)
    todo = [c for c, st in zip(cells, states, strict=True) if st in ("new", "resume")]
    shape = " x ".join(str(len(a.levels)) for a in spec.axes) or "1"
    seeds = len(spec.seeds) if spec.seeds is not None else 1
    lines.append(
        f"{len(cells)} cells ({shape} grid x {seeds} seeds), {total} iterations in all; "
        f"{sum(st == 'done' for st in states)} done, {sum(st == 'resume' for st in states)} to resume, "
        f"{sum(st == 'new' for st in states)} to start "
        f"({sum(c.cfg.train.max_iter or 0 for c in todo)} iterations at most)"
        + (f", {sum(st == 'diverged' for st in states)} diverged" if "diverged" in states else "")
        + (" (cells in epochs not counted)" if any(c.cfg.train.max_iter is None for c in cells) else "")
    )
    return "\n".join(lines)


def summary_row(cell: Cell, cell_dir: Path) -> dict[str, Any] | None:
    """The cell's row of summary.csv, or None while it has not finished."""
    info = _cell_info(cell_dir)
    state = cell_state(cell_dir)
    if state not in ("done", "diverged"):
        return None
    row: dict[str, Any] = {"cell": cell.name, **cell.labels, "seed": cell.seed, "status": state}
    if state == "done":
        bbox = json.loads((cell_dir / "metrics.json").read_text())["bbox"]
        row.update({k: round(float(bbox[k]), 4) for k in METRIC_NAMES})
        sigmas = final_sigmas(last_log_record(cell_dir / "log.jsonl"))
        row.update({f"sigma_{t}": round(s, 6) for t, s in sigmas.items()})
    wall = info.get("wall_s")
    row["wall_s"] = round(float(wall), 1) if wall is not None else ""
    row["resumed"] = info.get("resumed", "")
    return row


def write_summary(out: Path, cells: list[Cell]) -> Path:
    """Rewrite ``summary.csv`` from the finished cells (their own files), in cell order."""
    rows = [r for r in (summary_row(c, out / c.name) for c in cells) if r is not None]
    axes = list(dict.fromkeys(k for c in cells for k in c.labels))
    sigmas = list(dict.fromkeys(k for r in rows for k in r if k.startswith("sigma_")))
    fields = ["cell", *axes, "seed", "status", *METRIC_NAMES, *sigmas, "wall_s", "resumed"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    # every sweep process on the directory rewrites it; each from the cells' own files, so the last is whole
    return write_text_atomic(out / "summary.csv", text.getvalue())


def run_sweep(
    spec: SweepSpec, cells: list[Cell], out: Path, console: TextIO | None = None, only: list[Cell] | None = None
) -> list[str]:
    """Train every cell (of ``only``, when given) that is not done and that no other sweep process holds
    (``claimed``); return the names of the cells that diverged (recorded, not retried), in this process or
    an earlier one. ``summary.csv`` covers all ``cells``."""
    console = console if console is not None else sys.stdout
    todo = cells if only is None else only
    for c in cells:  # every folder checked before the first cell trains
        check_cell_config(c, out / c.name)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sweep.yaml", yaml.safe_dump(_spec_record(spec), sort_keys=False))
    write_summary(out, cells)
    keys = grid_keys(spec)
    elsewhere: list[str] = []
    for i, c in enumerate(todo, 1):
        d = out / c.name
        head = f"[sweep {i}/{len(todo)}] {c.name}"
        if _skipped(d, head, console):  # before claiming: a finished cell's folder stays as it is
            continue
        with claimed(d) as mine:
            if not mine:
                print(f"{head}: running in another sweep process, skipped", file=console, flush=True)
                elsewhere.append(c.name)
                continue
            if _skipped(d, head, console):  # again under the claim: another process may have finished it
                continue
            _train_cell(c, d, keys, head, console)
            write_summary(out, cells)
    if elsewhere:
        print(f"{len(elsewhere)} cells were left to the other sweep processes on {out}", file=console, flush=True)
    return [c.name for c in cells if cell_state(out / c.name) == "diverged"]


def _skipped(d: Path, head: str, console: TextIO) -> bool:
    state = cell_state(d)
    if state == "done":
        print(f"{head}: done, skipped", file=console, flush=True)
    elif state == "diverged":
        print(f"{head}: diverged in an earlier sweep, skipped (delete {d} to try again)", file=console, flush=True)
    return state in ("done", "diverged")


def _train_cell(c: Cell, d: Path, keys: list[str], head: str, console: TextIO) -> None:
    from robustdet.engine.trainer import Trainer
    from robustdet.errors import TrainingDiverged

    state = cell_state(d)
    print(f"{head}: {'resuming' if state == 'resume' else 'training'}", file=console, flush=True)
    info = {"name": c.name, "labels": c.labels, "seed": c.seed, "grid_keys": keys, "overrides": c.overrides,
            "status": "running", "resumed": state == "resume"}
    write_json_atomic(d / "cell.json", info)
    t0 = time.perf_counter()
    try:
        Trainer(c.cfg, d, resume=state == "resume", console=console).train()
    except TrainingDiverged as exc:
        info.update(status="diverged", error=str(exc), wall_s=time.perf_counter() - t0)
        write_json_atomic(d / "cell.json", info)
        print(f"{head}: diverged: {exc}", file=console, flush=True)
        return
    info.update(status="done", wall_s=time.perf_counter() - t0)
    write_json_atomic(d / "cell.json", info)


def _spec_record(spec: SweepSpec) -> dict[str, Any]:
    return {
        "config": str(spec.config),
        "overrides": spec.overrides,
        "seeds": spec.seeds,
        "grid": {a.name: {lab: o for lab, o in a.levels} for a in spec.axes},
    }


__all__ = [
    "Axis",
    "Cell",
    "SweepSpec",
    "build_cells",
    "cell_state",
    "check_cell_config",
    "load_sweep_file",
    "parse_grid_arg",
    "parse_seeds",
    "plan_text",
    "run_sweep",
    "safe_name",
    "select_cells",
    "spec_from_args",
    "write_summary",
]
