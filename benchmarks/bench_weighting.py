"""Cost of one ``step()`` (plain and window-closing) and of ``combine`` for each level weighting.

Run: ``.venv/bin/python benchmarks/bench_weighting.py [--levels 5] [--interval 100] [--windows 200]``.
Prints a Markdown table of median microseconds per call; the results live in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustdet.weighting import (
    AdaptiveVarianceWeighting,
    EqualWeighting,
    LevelWeighting,
    ReinforcementLearningOptimization,
)


def time_steps(weighting: LevelWeighting, losses: torch.Tensor, interval: int) -> tuple[float, float | None]:
    """Median µs of the steps that do not close a window, and of those that do (None if none do)."""
    plain: list[int] = []
    closing: list[int] = []
    clock = time.perf_counter_ns
    for m, row in enumerate(losses):
        start = clock()
        weighting.step(row)
        elapsed = clock() - start
        # Equal has no windows: every step is a plain one
        if isinstance(weighting, EqualWeighting) or (m + 1) % interval != 0:
            plain.append(elapsed)
        else:
            closing.append(elapsed)
    return statistics.median(plain) / 1e3, statistics.median(closing) / 1e3 if closing else None


def time_combine(weighting: LevelWeighting, levels: int, calls: int) -> float:
    """Median µs of ``combine`` (forward only) on float32 losses that require grad, like the engine's."""
    losses = torch.rand(levels, requires_grad=True)
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        weighting.combine(losses)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--interval", type=int, default=100)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    losses = torch.rand(args.windows * args.interval, args.levels, generator=torch.Generator().manual_seed(0))
    weightings: dict[str, LevelWeighting] = {
        "equal": EqualWeighting(args.levels),
        "avw": AdaptiveVarianceWeighting(args.levels, interval=args.interval),
        "rlo": ReinforcementLearningOptimization(args.levels, interval=args.interval),
    }
    print(
        f"torch {torch.__version__}, {args.levels} levels, interval {args.interval}, "
        f"{args.windows} windows, {args.threads} thread(s); median µs per call"
    )
    print("| weighting | step, plain | step, closing a window | combine |")
    print("|---|---|---|---|")
    for name, weighting in weightings.items():
        time_steps(weighting, losses[: 2 * args.interval], args.interval)  # warm-up
        plain, closing = time_steps(weighting, losses, args.interval)
        combine = time_combine(weighting, args.levels, calls=len(losses))
        closing_text = "n/a" if closing is None else f"{closing:.1f}"
        print(f"| {name} | {plain:.1f} | {closing_text} | {combine:.1f} |")


if __name__ == "__main__":
    main()
