"""Checkpoints that are never half-written, and that load without executing anything.

A checkpoint is written to a temporary file in the same folder, flushed to disk (fsync), and renamed
over ``last.pt`` only when complete; the previous ``last.pt`` is first renamed to ``prev.pt``. A run
killed at any instant therefore leaves a complete ``last.pt`` or a complete ``prev.pt``, and
``find_resumable`` takes the newest one that loads. ``Checkpointer`` is a run's writer: rank 0 writes,
every rank waits, and it knows the last iteration saved (what every "continue with --resume" names).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustdet import distributed as dist
from robustdet.errors import CheckpointError
from robustdet.files import fsync_dir

LAST = "last.pt"
PREV = "prev.pt"
# Test-only hook: seconds to sleep between the complete temporary file and the renames, so that a test
# can kill the process in the middle of a checkpoint write (tests/test_robustness.py).
TEST_DELAY_ENV = "ROBUSTDET_TEST_CHECKPOINT_DELAY"


def save_checkpoint(state: dict[str, Any], ckpt_dir: Path) -> Path:
    """Write ``state`` as ``ckpt_dir/last.pt``, keeping the previous one as ``prev.pt``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / LAST
    tmp = ckpt_dir / f".{LAST}.tmp-{os.getpid()}"
    for stale in ckpt_dir.glob(f".{LAST}.tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as exc:
            raise write_failure(last, exc) from exc
        if os.environ.get(TEST_DELAY_ENV):
            time.sleep(float(os.environ[TEST_DELAY_ENV]))
        if last.exists():
            os.replace(last, ckpt_dir / PREV)
        os.replace(tmp, last)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(ckpt_dir)
    return last


class Checkpointer:
    """``ckpt_dir/last.pt`` (and ``prev.pt``) of one run, written every ``checkpoint.period`` iterations."""

    def __init__(self, ckpt_dir: Path, period: int) -> None:
        self.dir = ckpt_dir
        self.period = period
        self.last_saved: int | None = None  # the iteration of the newest checkpoint this run wrote or resumed

    def save(self, state: dict[str, Any], iteration: int) -> None:
        """Rank 0 writes ``state`` (which every rank took part in building); every rank waits for it."""
        if dist.is_main():
            save_checkpoint(state, self.dir)
        dist.barrier()
        self.last_saved = iteration

    def resume_text(self) -> str:
        """Where a stopped run continues from, for the line that reports the stop."""
        if self.last_saved is None:
            return f"no checkpoint was written yet (checkpoint.period={self.period})"
        return f"the last checkpoint is {self.dir / LAST} (iteration {self.last_saved}); continue with --resume"


def write_failure(path: Path, exc: BaseException) -> CheckpointError:
    """One line for a checkpoint that could not be written, naming it and the space left beside it.

    A full disk makes torch.save fail mid-archive with the cryptic "[enforce fail at inline_container.cc]
    unexpected pos A vs B"; the free space says what happened. Nothing was replaced: the checkpoints
    already written stay as they were, so ``--resume`` still works once there is room.
    """
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MB free there"
    except OSError:
        free = "free space unknown"
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CheckpointError(f"{path}: cannot write the checkpoint ({reason}; {free}); earlier checkpoints are untouched")


def _check_archive(path: Path) -> None:
    """torch.save writes a zip archive whose entries carry CRC-32s: check them all (a truncated file or
    flipped bits would otherwise load as wrong numbers); ~0.1 s per 100 MB."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint (not a complete torch.save archive: {exc})"
        ) from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in its entry {bad!r})")


def _unpickling_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
    for line in lines:
        if "GLOBAL" in line:  # e.g. "Trying to load unsupported GLOBAL posix.system whose module ..."
            return line.rstrip(".")
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, nothing executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (a write was interrupted?)")
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the checkpoint holds objects that weights_only loading does not allow "
            f"(robustdet never executes code from a checkpoint): {_unpickling_reason(exc)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a robustdet checkpoint (no 'model' entry)")
    return state


def find_resumable(
    ckpt_dir: Path, problems: list[str] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``ckpt_dir`` that loads; a corrupt ``last.pt`` falls back to ``prev.pt``.

    Returns None when the folder has no checkpoint at all; raises when every candidate is unusable.
    Why a newer checkpoint was passed over (naming its file) is appended to ``problems`` when given.
    """
    errors = []
    for name in (LAST, PREV):
        path = ckpt_dir / name
        if not path.exists():
            continue
        try:
            found = path, load_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if problems is not None:
            problems.extend(errors)
        return found
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def rng_state() -> dict[str, Any]:
    """Every random stream of the process, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
