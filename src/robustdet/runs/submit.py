"""``robustdet sweep --executor slurm|local``: each cell one job, through submitit.

submitit (the library detectron2's and many labs' SLURM launchers use) pickles a callable and its arguments
into ``OUT/submitit/``, writes the sbatch file and submits it; here the callable is ``CellJob``, which runs
``sweep.run_cell``: the very steps a cell takes in ``robustdet sweep`` without an executor (skip when done,
claim the folder, train or resume, record ``cell.json``). So a re-submitted sweep skips the finished cells,
a cell cut short (time limit, preemption) resumes from its checkpoint, and ``--executor local`` (submitit's
LocalExecutor: the same pickled job, run as a local process) tests the SLURM path on any machine.

The options are submitit's own names (those of ``AutoExecutor.update_parameters`` and of Hydra's submitit
launcher, without the ``slurm_`` prefix): a ``slurm:`` section of the sweep file, and ``--slurm KEY=VALUE``
on top of it. See docs/distributed.md.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from robustdet.errors import ConfigError, SweepFailed
from robustdet.runs.sweep_spec import Cell
from robustdet.section import Section

# --executor NAME -> submitit's AutoExecutor cluster
EXECUTORS = {"slurm": "slurm", "local": "local"}
# keys submitit's AutoExecutor translates for every cluster; the others are SLURM's (``slurm_<key>``)
GENERIC = ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb")
# LocalExecutor's own default kills a job after 2 minutes: a cell that trains for hours needs more
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
POLL_S = {"local": 1.0, "slurm": 30.0}


class SlurmOptions(Section):
    """How each cell's job is asked for (None: the cluster's default)."""

    partition: str | None = None
    timeout_min: int | None = Field(None, ge=1)  # the job's time limit, minutes
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # at most this many cells at a time (the job array's %N); --jobs N sets it too
    array_parallelism: int | None = Field(None, ge=1)
    # times a job cut by its time limit or a preemption is requeued (it resumes from its checkpoint)
    max_num_timeout: int | None = Field(None, ge=0)
    # shell lines run before each job (``module load cuda``, ``source .venv/bin/activate``)
    setup: list[str] | None = None
    # any other sbatch option, e.g. {exclude: node12}
    additional_parameters: dict[str, Any] | None = None

    def executor_parameters(self, cluster: str, name: str) -> dict[str, Any]:
        """The keyword arguments of ``AutoExecutor.update_parameters`` for ``cluster``."""
        given = self.model_dump(exclude_none=True, exclude={"max_num_timeout"})
        params: dict[str, Any] = {"name": name}
        for key, value in given.items():
            params[key if key in GENERIC else f"{cluster if key == 'setup' else 'slurm'}_{key}"] = value
        if cluster == "local":
            params.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)
        return params


def slurm_options(from_file: dict[str, Any], from_args: Sequence[str], source: str) -> SlurmOptions:
    """The sweep file's ``slurm:`` section with the ``--slurm KEY=VALUE`` options over it; a bad key or value
    is one line naming it (``sweep.yaml: slurm.partiton: unknown key``, ``--slurm gpus_per_node=x: ...``)."""
    merged = dict(from_file)
    where = {k: f"{source}: slurm.{k}" for k in merged}
    for item in from_args:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm {item!r} is not of the form KEY=VALUE (e.g. partition=gpu)")
        try:
            merged[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--slurm {item!r}: the value is not valid YAML ({exc})") from None
        where[key] = f"--slurm {item}"
    try:
        return SlurmOptions.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        known = ", ".join(SlurmOptions.model_fields)
        why = f"unknown key (one of {known})" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{where.get(key, f'slurm.{key}')}: {why}") from None


class CellJob:
    """One cell as one submitit job. ``checkpoint`` is submitit's hook for a job at its time limit or
    preempted: it requeues the same call, which resumes the cell from its last checkpoint."""

    def __call__(self, out: str, cell: Cell, keys: list[str]) -> str:
        from robustdet.runs.sweep import run_cell

        return run_cell(cell, Path(out), keys, f"[job] {cell.name}", sys.stdout)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def make_executor(executor: str, folder: Path, options: SlurmOptions, name: str) -> Any:
    """submitit's AutoExecutor for ``executor`` (``slurm`` or ``local``) with ``options``."""
    import submitit

    cluster = EXECUTORS[executor]
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "--executor slurm: no sbatch on this machine's PATH (submit from a SLURM login node; "
            "--executor local runs the same jobs here)"
        )
    kwargs = {} if options.max_num_timeout is None else {f"{cluster}_max_num_timeout": options.max_num_timeout}
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster, **kwargs)
    ex.update_parameters(**options.executor_parameters(cluster, name))
    return ex


def submit_cells(
    executor: Any, cells: list[Cell], out: Path, keys: list[str], at_once: int | None,
    console: Any, finished: Callable[[], None],
) -> list[tuple[Cell, Any]]:
    """Submit one ``CellJob`` per cell and wait for them all: as one job array (SLURM: the scheduler keeps
    ``array_parallelism`` running), or, with ``at_once``, the next job as soon as one of ``at_once`` ends
    (LocalExecutor starts every job it is given at once). ``finished`` runs after each job that ends."""
    poll = POLL_S.get(getattr(executor, "cluster", "slurm"), 30.0)
    job, todo = CellJob(), list(cells)
    running: list[tuple[Cell, Any]] = []
    done: list[tuple[Cell, Any]] = []
    try:
        if at_once is None:
            with executor.batch():
                pending = [(c, executor.submit(job, str(out), c, keys)) for c in todo]
            # the jobs exist once the batch closes
            running, todo = pending, []
            _said(console, running)
        while todo or running:
            while todo and len(running) < (at_once or len(todo)):
                c = todo.pop(0)
                running.append((c, executor.submit(job, str(out), c, keys)))
                _said(console, running[-1:])
            ended = [(c, j) for c, j in running if j.done()]
            if not ended:
                time.sleep(poll)
                continue
            for item in ended:
                running.remove(item)
                done.append(item)
                finished()
    except KeyboardInterrupt:
        for _, j in running:  # local jobs stop with a checkpoint (SIGINT); SLURM jobs are cancelled likewise
            j.cancel(check=False)
        raise
    return done


def _said(console: Any, jobs: list[tuple[Cell, Any]]) -> None:
    for c, j in jobs:
        print(f"[sweep] {c.name}: job {j.job_id} (log {j.paths.stdout})", file=console, flush=True)


def check_jobs(jobs: list[tuple[Cell, Any]], diverged: list[str]) -> None:
    """A job that failed (not a diverged cell, which its job records and ends normally) stops the sweep with
    a ``SweepFailed`` naming its log."""
    failed = [(c, j) for c, j in jobs if j.exception() is not None and c.name not in diverged]
    if failed:
        names = ", ".join(c.name for c, _ in failed)
        raise SweepFailed(f"{len(failed)} cell jobs failed ({names}); see {failed[0][1].paths.stderr}")


__all__ = ["EXECUTORS", "CellJob", "SlurmOptions", "check_jobs", "make_executor", "slurm_options", "submit_cells"]
