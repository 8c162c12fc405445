"""Seconds per training iteration of the demo config, from the run's own log: compare two checkouts.

    PYTHONPATH=<checkout>/src .venv/bin/python benchmarks/bench_demo_step.py --repo <checkout>

Runs ``Trainer`` on ``configs/default.yaml`` of ``--repo`` for ``--iters`` iterations (no loader worker,
no checkpoint, evaluation on 8 images) and prints the elapsed time the log records every 10 iterations.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from robustdet.config import load_config
from robustdet.engine.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()
    overrides = [f"train.max_iter={args.iters}", "log.period=10", "log.progress=false", "checkpoint.period=0",
                 "data.num_workers=0", "eval.max_images=8"]
    cfg = load_config(Path(args.repo) / "configs" / "default.yaml", overrides)
    out = Path(tempfile.mkdtemp())
    Trainer(cfg, out).train()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    times = [(r["iter"], r["time"]) for r in records]
    print(args.repo, times, f"{times[-1][1] / times[-1][0]:.3f} s per iteration")


if __name__ == "__main__":
    main()
