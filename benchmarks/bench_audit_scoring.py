"""How fast ``robustdet audit`` scores once the detections exist (docs/benchmarks.md, "Audit").

Reads a finished audit folder (its ``audit.json`` config and ``fold_k/predictions.npz``), then times, as the
median of ``--repeat`` runs: ``score_annotations`` alone (audit/scores.py, the numpy scoring), ``score_split``
(that plus building its arrays from the split's COCO dict), and writing the csv files, cleaned.json and
index.html into a temporary folder.

    PYTHONPATH=src python benchmarks/bench_audit_scoring.py /tmp/audit --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustdet.audit.folds import Predictions
from robustdet.audit.outputs import score_split, write_outputs
from robustdet.audit.page import write_page
from robustdet.audit.scores import score_annotations
from robustdet.audit.split import load_split
from robustdet.config import config_from_stored


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    manifest = json.loads((args.audit_dir / "audit.json").read_text())
    cfg = config_from_stored(manifest["fingerprint"]["config"], str(args.audit_dir / "audit.json"))
    split = load_split(cfg)
    preds = Predictions.concat([Predictions.load(p) for p in sorted(args.audit_dir.glob("fold_*/predictions.npz"))])
    result = score_split(split, preds, 0.5)
    n_ann, n_det = len(result.anns.ids), len(result.dets.scores)
    core = median_time(lambda: score_annotations(result.anns, result.dets, len(split.dataset), 0.5), args.repeat)
    full = median_time(lambda: score_split(split, preds, 0.5), args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        files = median_time(lambda: write_outputs(result, Path(tmp), {"relabel", "drop", "add"}), args.repeat)
        page = median_time(lambda: write_page(result, Path(tmp)), max(1, args.repeat // 2))
    print(f"{n_ann} annotations, {n_det} detections, {len(split.dataset)} images")
    print(f"score_annotations: {core * 1e3:.1f} ms = {n_ann / core:,.0f} annotations/s")
    print(f"score_split (arrays from the COCO dict + scoring): {full * 1e3:.1f} ms = {n_ann / full:,.0f} annotations/s")
    print(f"csv files + cleaned.json: {files * 1e3:.1f} ms; index.html: {page * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
