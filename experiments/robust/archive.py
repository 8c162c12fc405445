"""Keeps issue 17's finished cells in the repository, since the run folders do not outlive a session (the
sweep's output, runs/robust, is not committed: its checkpoints are large). For each finished cell of
``runs`` it copies the files ``robustdet compare`` reads (config.yaml, metrics.json, eval.jsonl, cell.json,
machine.json, and the last training record of log.jsonl, where the final σ are) into ``cells/<cell>/``,
and it merges the sweep's summary.csv into the committed one: a cell's row from ``runs`` replaces the
committed row of that cell when it is done; committed rows of cells that ``runs`` no longer holds stay.

    .venv/bin/python experiments/robust/archive.py runs/robust experiments/robust
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

KEPT = ("config.yaml", "metrics.json", "eval.jsonl", "cell.json", "machine.json")


def archive_cell(cell: Path, dest: Path) -> None:
    """The files a comparison needs, and log.jsonl cut to its last training record."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (cell / name).exists():
            shutil.copy2(cell / name, dest / name)
    log = cell / "log.jsonl"
    if log.exists():
        steps = [line for line in log.read_text().splitlines() if line.strip() and "event" not in json.loads(line)]
        (dest / "log.jsonl").write_text(steps[-1] + "\n" if steps else "")


def read_rows(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    if not path.exists():
        return [], {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), {row["cell"]: row for row in reader}


def merge_summaries(committed: Path, new: Path) -> int:
    """Rewrites ``committed`` with the done rows of ``new`` merged in; the number of rows."""
    fields, rows = read_rows(committed)
    new_fields, new_rows = read_rows(new)
    for name, row in new_rows.items():
        if row.get("status") == "done" or name not in rows:
            rows[name] = row
    fields += [f for f in new_fields if f not in fields]
    with committed.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows.values())
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the sweep's output folder (runs/robust)")
    parser.add_argument("dest", type=Path, help="experiments/robust: cells/ and summary.csv")
    args = parser.parse_args()
    done = [c for c in sorted(args.runs.iterdir()) if (c / "metrics.json").exists() and (c / "cell.json").exists()]
    for cell in done:
        archive_cell(cell, args.dest / "cells" / cell.name)
    rows = merge_summaries(args.dest / "summary.csv", args.runs / "summary.csv")
    shutil.copy2(args.dest / "summary.csv", args.dest / "cells" / "summary.csv")  # compare's cell order
    print(f"archive.py: {len(done)} finished cells kept in {args.dest / 'cells'}; summary.csv {rows} rows")


if __name__ == "__main__":
    main()
