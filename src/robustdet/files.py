"""The one atomic file writer: a reader sees the old file or the complete new one, never half of it.

Used for everything a run or a command writes that something else reads back (config.yaml, metrics.json,
dataset jsons, sidecars); checkpoints add their own rotation on top (``engine/checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when it does not exist), up to a line cut by a kill: a process
    killed mid-write leaves a partial last line, and everything before it is whole."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any], *, mode: int = 0o644) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush and fsync it, then rename it over ``path``.

    The temporary file is removed when ``write`` fails (or the process is interrupted in Python);
    ``mode`` replaces mkstemp's 0600 so outputs are readable like any other file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as JSON to ``path`` atomically; ``indent=None`` writes it compact (large dataset jsons)."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(obj, indent=indent, separators=separators) + ("\n" if indent is not None else "")
    return write_text_atomic(path, text)


__all__ = ["fsync_dir", "read_jsonl", "write_atomic", "write_json_atomic", "write_text_atomic"]
