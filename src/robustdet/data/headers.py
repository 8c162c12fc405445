"""Image headers (size as decoded, frame count) read once: on rank 0, in threads, cached on disk.

At COCO scale (118k images) opening every header costs minutes per process, at every start and resume.
``read_headers`` therefore

- reads on rank 0 only and broadcasts the result (``robustdet.distributed.broadcast_object``), so
  the other ranks of a torchrun wait instead of reading the same files;
- reads the headers that are not cached in a thread pool (opening and reading files is I/O, during
  which CPython releases the GIL; header parsing itself is Python under the GIL and gains nothing);
- caches them in a json file whose entries are keyed by (absolute path, size, mtime_ns), so a resume
  or a new run over the same files re-reads nothing that did not change.

Where the cache lives: ``cache_dir`` when given (``build_dataset(..., cache_dir=...)``), else
``$ROBUSTDET_CACHE/headers``, else ``~/.cache/robustdet/headers`` (as the synthetic data), one file per
dataset (its source file and image root). A cache that is unreadable, truncated, of another version or
has malformed entries is ignored (entry by entry where possible) and rewritten; a cache that cannot be
written costs a warning.
Failed reads are never cached: a file that was unreadable is read again at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from robustdet import distributed as dist
from robustdet.errors import DatasetError
from robustdet.files import write_json_atomic

# Bump when what an entry means changes, so that old caches are not mistaken for new ones.
CACHE_VERSION = 1
# Threads that read uncached headers, chosen from benchmarks/bench_loader.py --headers 3000 --cold
# (docs/benchmarks.md): files dropped from the page cache, as a dataset's files usually are at its first
# start (the only time headers are uncached), 8 threads took 0.63-0.92 of 1 thread's time even on this
# machine's local disk, and the gain grows with each open's I/O wait (network file systems); files in the
# page cache are Pillow's parsing under the GIL, where 8 threads took 1.8-2.8x (+0.15-0.24 s per 3,000).
HEADER_THREADS = 8

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

Header = tuple[int, int, int]  # (width, height, frames), EXIF orientation applied
HeaderResult = Header | str  # a str says why the header cannot be read, naming the file


def read_header(path: str | Path) -> Header:
    """(width, height, frames) of ``path`` as it will be decoded (EXIF orientation applied), undecoded.

    Cheap for JPEG (the header and EXIF block only); for PNG, Pillow reads the whole file looking for
    EXIF, which also catches truncated PNGs. ``frames`` counts GIF frames (an animated GIF decodes to
    several images); other formats report 1.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            frames = im.n_frames if im.format == "GIF" else 1
    except (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the image header ({exc})") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return int(width), int(height), int(frames)


def default_cache_dir() -> Path:
    env = os.environ.get("ROBUSTDET_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "robustdet") / "headers"


def cache_file(cache_dir: str | Path | None, *key: str) -> Path:
    """The cache file of the dataset whose files ``key`` names (its source file and image root)."""
    digest = hashlib.sha256(json.dumps([os.path.abspath(k) for k in key]).encode()).hexdigest()[:16]
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / f"headers-{digest}.json"


def _load_cache(path: Path) -> dict[str, list[int]]:
    """path -> [size, mtime_ns, width, height, frames]; anything unusable is left out (and so re-read)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):  # missing, unreadable, truncated or not json
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return {
        name: entry
        for name, entry in data["entries"].items()
        if isinstance(entry, list)
        and len(entry) == 5
        and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
        and entry[2] > 0
        and entry[3] > 0
        and entry[4] > 0
    }


def _read_one(path: str) -> HeaderResult:
    try:
        return read_header(path)
    except DatasetError as exc:
        return str(exc)


def _read_all(paths: Sequence[str], cache: Path | None, threads: int) -> list[HeaderResult]:
    cached = _load_cache(cache) if cache is not None else {}
    results: list[HeaderResult | None] = [None] * len(paths)
    stats: dict[str, tuple[int, int]] = {}
    missing: list[int] = []
    # entries are keyed by absolute path: a relative image root means other files from another cwd
    keys = [os.path.abspath(p) for p in paths]
    for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
        try:
            st = os.stat(path)
        except OSError as exc:
            results[i] = f"{path}: cannot read the image header ({exc})"
            continue
        stats[key] = (st.st_size, st.st_mtime_ns)
        entry = cached.get(key)
        if entry is not None and (entry[0], entry[1]) == stats[key]:
            results[i] = (entry[2], entry[3], entry[4])
        else:
            missing.append(i)
    if missing:
        miss_paths = [paths[i] for i in missing]
        if threads > 1 and len(missing) > 1:
            with ThreadPoolExecutor(max_workers=min(threads, len(missing))) as pool:
                read = list(pool.map(_read_one, miss_paths, chunksize=16))
        else:
            read = [_read_one(p) for p in miss_paths]
        for i, result in zip(missing, read, strict=True):
            results[i] = result
    fresh = {
        key: [*stats[key], *result]
        for key, result in zip(keys, results, strict=True)
        if isinstance(result, tuple) and key in stats
    }
    # a resume over unchanged files writes nothing; entries of other files are kept, as the splits of one
    # dataset (e.g. VOC trainval and test) may share a cache file
    if cache is not None and any(cached.get(path) != entry for path, entry in fresh.items()):
        _write_cache(cache, cached | fresh)
    return [r for r in results if r is not None]  # every slot was filled above


def _write_cache(cache: Path, entries: dict[str, list[int]]) -> None:
    try:
        write_json_atomic(cache, {"version": CACHE_VERSION, "entries": entries}, indent=None)
    except OSError as exc:
        # the headers were read; only the next start pays for them again
        print(f"robustdet: warning: cannot write the image header cache {cache} ({exc})", file=sys.stderr)


def read_headers(paths: Sequence[str], cache: Path | None = None, threads: int = HEADER_THREADS) -> list[HeaderResult]:
    """The header of each of ``paths``, in order: a ``Header`` or the message why it cannot be read.

    Under torchrun every rank must call this with the same ``paths`` (as every rank builds the same
    dataset): rank 0 reads and caches, the others receive its result.
    """
    if not dist.is_distributed():
        return _read_all(paths, cache, threads)
    outcome: Any = None
    if dist.rank() == 0:
        try:
            outcome = ("ok", _read_all(paths, cache, threads))
        except Exception as exc:
            # the other ranks wait in the broadcast: tell them, rather than leave them to time out
            outcome = ("error", f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                dist.broadcast_object(outcome)
            raise
    outcome = dist.broadcast_object(outcome)
    if outcome[0] == "error":
        raise DatasetError(f"reading the image headers failed on rank 0 ({outcome[1]})")
    return outcome[1]
