"""The most the test suite holds in its temp folder at any moment, and its wall time (issue 19, item 5).

    nice -n 5 .venv/bin/python benchmarks/suite_temp_peak.py --basetemp /tmp/tp_x -- -q tests/test_robustness.py

Runs ``python -m pytest <args> --basetemp=DIR -p no:cacheprovider`` (with ``-n 2`` xdist puts one folder
per worker under DIR, so the peak is the whole suite's) and sums the sizes of the files under DIR every
``--interval`` seconds. Prints the peak, which top-level folders (per worker: the second level too) held it,
and the wall time. Stdlib only; a file removed while being counted is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def folder_sizes(root: Path) -> dict[str, int]:
    """Bytes under each test folder of ``root`` (``popen-gw0/test_x0`` under xdist, ``test_x0`` without)."""
    sizes: dict[str, int] = {}
    for top, _, files in os.walk(root):
        parts = Path(top).relative_to(root).parts
        key = "/".join(parts[:2] if parts and parts[0].startswith("popen-gw") else parts[:1]) or "."
        for name in files:
            with contextlib.suppress(OSError):  # removed between the listing and the stat
                sizes[key] = sizes.get(key, 0) + os.lstat(os.path.join(top, name)).st_size
    return sizes


def watch(cmd: list[str], root: Path, interval: float) -> tuple[int, int, dict[str, int], float]:
    """Run ``cmd``, polling ``root``: (exit status, peak bytes, the folders at the peak, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak, at_peak = 0, {}
    while True:
        done = proc.poll() is not None
        sizes = folder_sizes(root) if root.exists() else {}
        if sum(sizes.values()) > peak:
            peak, at_peak = sum(sizes.values()), sizes
        if done:
            return proc.returncode, peak, at_peak, time.monotonic() - started
        time.sleep(interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--basetemp", required=True, type=Path, help="pytest's temp folder (emptied first)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two polls")
    parser.add_argument("--top", type=int, default=8, help="how many folders at the peak to print")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest's arguments")
    args = parser.parse_args()
    pytest_args = [a for a in args.pytest_args if a != "--"]
    shutil.rmtree(args.basetemp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pytest", *pytest_args, f"--basetemp={args.basetemp}", "-p", "no:cacheprovider"]
    rc, peak, at_peak, seconds = watch(cmd, args.basetemp, args.interval)
    print(f"temp peak {peak / 1e6:.1f} MB, wall {seconds:.1f} s, pytest exit {rc}: {' '.join(pytest_args)}")
    for name, size in sorted(at_peak.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  at the peak: {size / 1e6:9.1f} MB  {name}")
    shutil.rmtree(args.basetemp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
