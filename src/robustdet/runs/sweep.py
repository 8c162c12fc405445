"""``robustdet sweep``: training a sweep's cells, one run directory per cell, and ``OUT/summary.csv``.

The cells (``runs/sweep_spec.py``) run one after another in this process with ``Trainer``, each into
``OUT/<cell name>``, and ``summary.csv`` gains a row as each finishes. Running the same sweep again skips
finished cells (``metrics.json``), resumes interrupted ones exactly from their checkpoints, and refuses a
cell folder whose config differs from the sweep's. Several processes (``--jobs N``, SLURM jobs:
``runs/launch.py``) may share one directory: each cell is claimed by one of them (``claimed``) and
``run_cell`` is the one code path every one of them takes. See docs/experiments.md.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from robustdet.engine.evaluator import METRIC_NAMES
from robustdet.errors import ConfigError, TrainingDiverged
from robustdet.files import write_json_atomic, write_text_atomic
from robustdet.runs.reader import read_cell, read_config, read_final_sigmas, read_machine, read_metrics
from robustdet.runs.settings import result_config
from robustdet.runs.sweep_spec import Cell, SweepSpec, grid_keys, override_text


# ------------------------------------------------------------------------------------------------ running
def cell_state(cell_dir: Path) -> str:
    """``done`` (metrics.json), ``diverged`` (an earlier sweep recorded it), ``resume`` (a checkpoint) or ``new``."""
    if (cell_dir / "metrics.json").exists():
        return "done"
    if read_cell(cell_dir).get("status") == "diverged":
        return "diverged"
    ckpts = cell_dir / "checkpoints"
    # prev.pt alone: a kill in the middle of replacing last.pt (the trainer's --resume falls back to it)
    if (ckpts / "last.pt").exists() or (ckpts / "prev.pt").exists():
        return "resume"
    return "new"


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
        old = read_config(cell_dir)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; delete the cell folder to run it again") from None
    new = cell.cfg.model_dump(mode="json")
    # an option added since the run was trained is absent from its config.yaml: read it with the defaults
    # filled in, so that a new key at its default does not make every earlier cell "another config"
    with contextlib.suppress(ValidationError):
        old = type(cell.cfg).model_validate(old).model_dump(mode="json")
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
    info = read_cell(cell_dir)
    state = cell_state(cell_dir)
    if state not in ("done", "diverged"):
        return None
    row: dict[str, Any] = {"cell": cell.name, **cell.labels, "seed": cell.seed, "status": state}
    if state == "done":
        bbox = read_metrics(cell_dir)["bbox"]
        row.update({k: round(float(bbox[k]), 4) for k in METRIC_NAMES})
        sigmas = read_final_sigmas(cell_dir)
        row.update({f"sigma_{t}": round(s, 6) for t, s in sigmas.items()})
    wall = info.get("wall_s")
    row["wall_s"] = round(float(wall), 1) if wall is not None else ""
    row["machine"] = read_machine(cell_dir)
    row["resumed"] = info.get("resumed", "")
    return row


def write_summary(out: Path, cells: list[Cell]) -> Path:
    """Rewrite ``summary.csv`` from the finished cells (their own files), in cell order."""
    rows = [r for r in (summary_row(c, out / c.name) for c in cells) if r is not None]
    axes = list(dict.fromkeys(k for c in cells for k in c.labels))
    sigmas = list(dict.fromkeys(k for r in rows for k in r if k.startswith("sigma_")))
    fields = ["cell", *axes, "seed", "status", *METRIC_NAMES, *sigmas, "wall_s", "resumed", "machine"]
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
    prepare(spec, cells, out)
    keys = grid_keys(spec)
    elsewhere: list[str] = []
    for i, c in enumerate(todo, 1):
        outcome = run_cell(c, out, keys, f"[sweep {i}/{len(todo)}] {c.name}", console)
        if outcome == "elsewhere":
            elsewhere.append(c.name)
        elif outcome == "trained":
            write_summary(out, cells)
    if elsewhere:
        print(f"{len(elsewhere)} cells were left to the other sweep processes on {out}", file=console, flush=True)
    return diverged_cells(cells, out)


def prepare(spec: SweepSpec, cells: list[Cell], out: Path) -> None:
    """Before any cell trains: every cell folder checked against its cell's config (one error, here, for a
    folder that holds another run), the sweep recorded (``sweep.yaml``), and ``summary.csv`` written."""
    for c in cells:
        check_cell_config(c, out / c.name)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sweep.yaml", yaml.safe_dump(_spec_record(spec), sort_keys=False))
    write_summary(out, cells)


def diverged_cells(cells: list[Cell], out: Path) -> list[str]:
    return [c.name for c in cells if cell_state(out / c.name) == "diverged"]


def run_cell(c: Cell, out: Path, keys: list[str], head: str, console: TextIO) -> str:
    """One cell, the same way in every process that runs cells (this one, ``--jobs``, a SLURM job): skipped
    when done or diverged, left alone when another process holds it, else claimed and trained (or resumed).
    Returns ``done``, ``diverged``, ``elsewhere`` or ``trained``."""
    d = out / c.name
    if skipped(d, head, console):  # before claiming: a finished cell's folder stays as it is
        return cell_state(d)
    with claimed(d) as mine:
        if not mine:
            print(f"{head}: running in another sweep process, skipped", file=console, flush=True)
            return "elsewhere"
        if skipped(d, head, console):  # again under the claim: another process may have finished it
            return cell_state(d)
        _train_cell(c, d, keys, head, console)
    return "trained"


def skipped(d: Path, head: str, console: TextIO) -> bool:
    state = cell_state(d)
    if state == "done":
        print(f"{head}: done, skipped", file=console, flush=True)
    elif state == "diverged":
        print(f"{head}: diverged in an earlier sweep, skipped (delete {d} to try again)", file=console, flush=True)
    return state in ("done", "diverged")


def _train_cell(c: Cell, d: Path, keys: list[str], head: str, console: TextIO) -> None:
    # imported here: --dry-run and the sweep's own bookkeeping need no torch
    from robustdet.engine.trainer import Trainer

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
        **({"slurm": spec.slurm} if spec.slurm else {}),
    }


__all__ = [
    "cell_state",
    "check_cell_config",
    "claimed",
    "diverged_cells",
    "plan_text",
    "prepare",
    "run_cell",
    "run_sweep",
    "skipped",
    "summary_row",
    "write_summary",
]
