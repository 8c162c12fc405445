"""Milliseconds per optimizer step on the demo's RetinaNet (12 M parameters): torch's per-tensor loop,
``foreach`` and ``fused`` implementations of AdamW and SGD, side by side in one process.

    .venv/bin/python benchmarks/bench_optimizer.py --threads 1

The trainer uses the fused ones (engine/optim.py::build_optimizer). Medians over ``--repeats`` steps
after 3 warm-up steps, random gradients. The results live in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from robustdet.config import load_config
from robustdet.models.build import build_model

IMPLEMENTATIONS = (("per-tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, ["loss.bayesian=false", "weighting.name=equal"]), 5)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    threads = torch.get_num_threads()
    print(f"{n / 1e6:.2f} M parameters in {len(params)} tensors, {threads} threads, torch {torch.__version__}")
    print("| optimizer | implementation | ms per step (median) | vs per-tensor |")
    print("|---|---|---|---|")
    makers = {
        "AdamW": lambda **kw: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, **kw),
        "SGD": lambda **kw: torch.optim.SGD(params, lr=1e-2, momentum=0.9, **kw),
    }
    for name, make in makers.items():
        base = None
        for impl, kw in IMPLEMENTATIONS:
            opt = make(**kw)
            for _ in range(3):
                opt.step()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            base = base or ms
            print(f"| {name} | {impl} | {ms:.1f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
