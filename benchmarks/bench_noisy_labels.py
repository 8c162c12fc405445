"""What the noisy-label switches cost in the dense classification loss, side by side in one process.

The loss of ``DenseDetector.classification_loss`` (``dense.noisy_label_focal`` per CPU chunk, then the sum
over classes), forward and backward, on the shapes of the robust benchmark's RetinaNet cell: batch 8,
96 px input (P3-P7, 9 anchors per location: 1,746 anchors per image), 3 classes, 2 % foreground anchors,
logits ~ N(−4, 2) (near the 0.01 prior, with a tail above BRL's threshold). Switches alternate call by call;
the table gives the median wall ms per call and the ratio to today's focal loss.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_noisy_labels.py [--repeats 60] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustdet.losses import LossConfig
from robustdet.models.dense import CPU_CHUNK_ELEMENTS, noisy_label_focal

SWITCHES: dict[str, dict[str, object]] = {
    "focal (off)": {},
    "bootstrap": {"cls_method": "bootstrap"},
    "label_smoothing": {"cls_method": "label_smoothing"},
    "gce": {"cls_method": "gce"},
    "brl": {"brl": True},
}


def one_call(logits: torch.Tensor, labels: torch.Tensor, fg: torch.Tensor, cfg: LossConfig) -> float:
    x = logits.detach().requires_grad_(True)
    start = time.perf_counter()
    rows = max(1, CPU_CHUNK_ELEMENTS // x.shape[1])
    parts = []
    for xc, lab, f in zip(x.split(rows), labels.split(rows), fg.split(rows), strict=True):
        t = torch.zeros_like(xc).scatter_(1, lab[:, None], f[:, None].to(xc.dtype))
        parts.append(noisy_label_focal(xc, t, f, None, cfg).value.sum(dim=1))
    torch.cat(parts).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = 8 * 1746
    logits = torch.randn(n, 3, generator=g) * 2 - 4
    labels = torch.randint(0, 3, (n,), generator=g)
    fg = torch.rand(n, generator=g) < 0.02
    cfgs = {name: LossConfig(**kw) for name, kw in SWITCHES.items()}
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for r in range(args.repeats + 3):
        order = list(cfgs)[r % len(cfgs) :] + list(cfgs)[: r % len(cfgs)]
        for name in order:
            dt = one_call(logits, labels, fg, cfgs[name])
            if r >= 3:  # warm-up calls left out
                times[name].append(dt)
    base = statistics.median(times["focal (off)"])
    print(f"{'switch':<16} {'ms / call':>9} {'ratio':>6}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<16} {med * 1e3:>9.2f} {med / base:>6.2f}")


if __name__ == "__main__":
    main()
