"""RetinaNet, FCOS and Faster R-CNN on the synthetic shapes, each with the same CPU time budget.

For every detector and method the script first times a few training iterations, sets ``train.max_iter``
so that training fills ``--budget`` seconds (a real cosine schedule to the end, not a run cut short),
trains from scratch, evaluates on the synthetic validation split and prints one JSON line per run and a
Markdown table at the end. Methods: baseline (plain losses, equal weights), bayesian (Eq. 19 of
Khanzhina et al.), avw, rlo (Luo et al.) and bayesian_rlo.

    .venv/bin/python benchmarks/detectors_synthetic.py --budget 180 --methods baseline bayesian_rlo

Each detector's config is its small CPU config: configs/default.yaml (RetinaNet), configs/fcos_synthetic.yaml,
configs/faster_rcnn_synthetic.yaml.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from robustdet.config import load_config
from robustdet.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "retinanet": REPO / "configs" / "default.yaml",
    "fcos": REPO / "configs" / "fcos_synthetic.yaml",
    "faster_rcnn": REPO / "configs" / "faster_rcnn_synthetic.yaml",
}


def method_overrides(method: str, detector: str) -> list[str]:
    bayesian = "bayesian" in method
    weighting = {"baseline": "equal", "bayesian": "equal", "avw": "avw", "rlo": "rlo", "bayesian_rlo": "rlo"}[method]
    out = [f"loss.bayesian={'true' if bayesian else 'false'}", f"weighting.name={weighting}"]
    if detector == "fcos" and bayesian:
        out.append("loss.box_loss=smooth_l1")  # GIoU has no Bayesian form
    return out


def seconds_per_iter(config: Path, overrides: list[str], probe_iters: int, tmp: Path) -> float:
    """Median seconds of one training iteration, from the run's own log (time is cumulative)."""
    cfg = load_config(config, [*overrides, f"train.max_iter={probe_iters}", "log.period=1", "eval.period=0",
                               "eval.max_images=1", "checkpoint.period=0", "log.progress=false",
                               "log.tensorboard=false"])
    out = tmp / "probe"
    Trainer(cfg, out).train()
    times = [json.loads(line)["time"] for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [b - a for a, b in itertools.pairwise(times)][2:]  # drop warm-up
    return statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds per run")
    ap.add_argument("--detectors", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=["baseline", "bayesian", "rlo", "bayesian_rlo"],
                    choices=["baseline", "bayesian", "avw", "rlo", "bayesian_rlo"])
    ap.add_argument("--probe-iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the run directories here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="detectors-synthetic-"))
    rows = []
    for detector in args.detectors:
        for method in args.methods:
            overrides = [*method_overrides(method, detector), f"train.num_threads={args.threads}"]
            run = root / f"{detector}_{method}"
            spi = seconds_per_iter(CONFIGS[detector], overrides, args.probe_iters, run)
            iters = max(20, int(args.budget / spi))
            cfg = load_config(CONFIGS[detector], [*overrides, f"train.max_iter={iters}", "log.progress=false",
                                                  "checkpoint.period=0", "eval.period=0"])
            t0 = time.perf_counter()
            metrics = Trainer(cfg, run / "run").train()
            secs = time.perf_counter() - t0
            assert metrics is not None
            row = {"detector": detector, "method": method, "iters": iters, "s_per_iter": round(spi, 3),
                   "seconds": round(secs, 1), "AP": round(metrics["bbox"]["AP"], 1),
                   "AP50": round(metrics["bbox"]["AP50"], 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| detector | method | iterations | s/iter | wall s (train+eval) | AP | AP50 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detector']} | {r['method']} | {r['iters']} | {r['s_per_iter']} | {r['seconds']} | "
              f"{r['AP']} | {r['AP50']} |")


if __name__ == "__main__":
    main()
