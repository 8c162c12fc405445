"""Where a sweep's cells train: in this process (the default), in N local processes (``--jobs N``), or one
submitit job per cell (``--executor slurm``, ``--executor local``). Every way runs each cell through
``sweep.run_cell`` and ends with ``summary.csv`` over every finished cell; the cells that diverged are
returned (the CLI reports them), a process or job that failed is a ``SweepFailed`` naming its log.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from robustdet.errors import ConfigError, SweepFailed
from robustdet.runs.sweep import (
    cell_state,
    check_cell_config,
    claimed,
    diverged_cells,
    prepare,
    run_sweep,
    skipped,
    write_summary,
)
from robustdet.runs.sweep_spec import Cell, SweepSpec, grid_keys


def launch(
    spec: SweepSpec, cells: list[Cell], out: Path, *, only: list[Cell] | None = None, executor: str | None = None,
    jobs: int | None = None, slurm: Sequence[str] = (), child_args: Sequence[str] = (), console: TextIO | None = None,
) -> list[str]:
    """Train the cells (of ``only``, when given) that are not done; return the names of the diverged cells.

    ``jobs``: cells at a time (``--jobs``: N processes; with an executor, N jobs at a time); ``slurm``: the
    ``--slurm KEY=VALUE`` options; ``child_args``: the sweep's command line for the ``--jobs`` processes.
    """
    console = console if console is not None else sys.stdout
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be at least 1")
    if executor is None:
        if slurm:
            raise ConfigError(f"--slurm {slurm[0]}: needs --executor slurm (or local)")
        if jobs is not None and jobs > 1:
            return run_processes(child_args, cells, out, jobs, console)
        return run_sweep(spec, cells, out, console, only=only)
    return run_jobs(spec, cells, out, executor, only=only, jobs=jobs, slurm=slurm, console=console)


def run_processes(child_args: Sequence[str], cells: list[Cell], out: Path, jobs: int, console: TextIO) -> list[str]:
    """``--jobs N``: N sweep processes on one directory, each training the next cell nobody holds
    (``sweep.claimed``), each with its share of the cores (OMP_NUM_THREADS) and its log in OUT/jobs/."""
    for c in cells:  # a folder holding another config: the one-line error here, not in N logs
        check_cell_config(c, out / c.name)
    cmd = [sys.executable, "-m", "robustdet", "sweep", *child_args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    logs = out / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for k in range(jobs):
        with open(logs / f"job{k}.log", "a") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    print(f"{jobs} sweep processes, {env['OMP_NUM_THREADS']} threads each; their output: {logs}/job*.log",
          file=console, flush=True)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the cells resume from their checkpoints on the next run
        for p in procs:
            p.terminate()
        raise
    write_summary(out, cells)
    diverged = diverged_cells(cells, out)
    failed = [k for k, rc in enumerate(codes) if rc != 0]
    if failed and not diverged:  # a diverged cell alone makes its process exit non-zero; reported by the CLI
        raise SweepFailed(f"sweep processes {failed} failed; see {logs}/job{failed[0]}.log")
    return diverged


def child_args(
    config: str, overrides: Sequence[str], grid: Sequence[str], only: Sequence[str], seeds: str | None, out: Path
) -> list[str]:
    """The ``robustdet sweep`` arguments of a ``--jobs`` process: this sweep, without ``--jobs``."""
    args = [config, *overrides, "--out", str(out)]
    for g in grid:
        args += ["--grid", g]
    for o in only:
        args += ["--only", o]
    if seeds is not None:
        args += ["--seeds", seeds]
    return args


def run_jobs(
    spec: SweepSpec, cells: list[Cell], out: Path, executor: str, *, only: list[Cell] | None, jobs: int | None,
    slurm: Sequence[str], console: TextIO,
) -> list[str]:
    """One submitit job per cell still to train (``runs/submit.py``); done, diverged and claimed cells are
    not submitted. Waits for the jobs, then writes ``summary.csv``."""
    from robustdet.runs.submit import check_jobs, make_executor, slurm_options, submit_cells

    options = slurm_options(spec.slurm, slurm, spec.source)
    if executor == "slurm" and jobs is not None and options.array_parallelism is None:
        options.array_parallelism = jobs
    prepare(spec, cells, out)
    todo = cells if only is None else only
    waiting = []
    for i, c in enumerate(todo, 1):
        head = f"[sweep {i}/{len(todo)}] {c.name}"
        if skipped(out / c.name, head, console):
            continue
        with claimed(out / c.name) as free:
            if not free:
                print(f"{head}: running in another sweep process, not submitted", file=console, flush=True)
                continue
        print(f"{head}: {'resuming' if cell_state(out / c.name) == 'resume' else 'training'} as a job",
              file=console, flush=True)
        waiting.append(c)
    if waiting:
        ex = make_executor(executor, out / "submitit", options, f"robustdet-{out.name}")
        at_once = (jobs or 1) if executor == "local" else None
        done = submit_cells(ex, waiting, out, grid_keys(spec), at_once, console, lambda: write_summary(out, cells))
        write_summary(out, cells)
        check_jobs(done, diverged_cells(cells, out))
    return diverged_cells(cells, out)


__all__ = ["child_args", "launch", "run_jobs", "run_processes"]
