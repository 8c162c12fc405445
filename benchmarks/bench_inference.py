"""Inference speed and training-step peak memory of robustdet's RetinaNet against torchvision's, same weights.

The torchvision twin and the batches are ``bench_train_step.py``'s (imported, not copied): identical weights,
the same images. Measured per case:

- inference: ``model.eval()`` under ``torch.inference_mode()``, the images in one batch through transform,
  backbone, head, anchors and post-processing (decode, top-k, batched NMS); images per second from the
  median process CPU time of alternating repeats (one torch thread). ``--score-thresh`` is set on both
  (default 0.005): at random initialisation every score sits near the prior 0.01, so torchvision's 0.05
  would leave post-processing nothing to do, while 0.005 sends each level's top 1,000 candidates through
  NMS, as a trained model's busy image does. Both keep robustdet's ``model.detections_per_img`` (100) and
  must give the same detections (checked).
- peak memory of a training step (forward + backward): the peak resident set size (``ru_maxrss``) of a
  fresh subprocess per side that builds both models and the batch, then runs two steps of one side; reported
  as the rise of the peak above the resident size just before the first step (the setup is identical on
  both sides). tracemalloc does not see torch's allocations, hence the process-level figure.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_inference.py [--repeats 10] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_train_step import CASES, Case, make_batch, make_cfg, torchvision_twin
from robustdet.models import PerLevelRetinaNet, build_model


def build_pair(case: Case, num_classes: int) -> tuple[PerLevelRetinaNet, torch.nn.Module]:
    cfg = make_cfg(case.size)
    torch.manual_seed(0)
    ours = build_model(cfg, num_classes)
    assert isinstance(ours, PerLevelRetinaNet)
    return ours, torchvision_twin(ours, cfg, num_classes)


def inference(case: Case, args: argparse.Namespace) -> str:
    ours, tv = build_pair(case, args.num_classes)
    device = torch.device("cpu")
    images, _ = make_batch(case, args.num_classes, device)
    for m in (ours, tv):
        m.eval()
        m.score_thresh = args.score_thresh
    tv.detections_per_img = ours.detections_per_img  # robustdet's model.detections_per_img (100), not 300

    with torch.inference_mode():
        a, b = ours(images), tv(images)
    for i, (da, db) in enumerate(zip(a, b, strict=True)):
        same = (
            da["boxes"].shape == db["boxes"].shape
            and torch.allclose(da["boxes"], db["boxes"], atol=1e-3)
            and torch.allclose(da["scores"], db["scores"], atol=1e-6)
            and torch.equal(da["labels"], db["labels"])
        )
        if not same:
            raise RuntimeError(f"{case.name}: image {i}: detections differ between robustdet and torchvision")
    count = sum(len(d["boxes"]) for d in a)

    def run_ours() -> None:
        with torch.inference_mode():
            ours(images)

    def run_tv() -> None:
        with torch.inference_mode():
            tv(images)

    # alternating, process CPU time (one torch thread): on a shared CPU the wall time mostly measures the
    # wait for a core; the wall medians are printed too
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "tv": []}
    for r in range(args.warmup + args.repeats):
        for name, fn in (("ours", run_ours), ("tv", run_tv)) if r % 2 else (("tv", run_tv), ("ours", run_ours)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            if r >= args.warmup:
                runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    cpu_o, cpu_t = (statistics.median(t[1] for t in runs[k]) for k in ("ours", "tv"))
    wall_o, wall_t = (statistics.median(t[0] for t in runs[k]) for k in ("ours", "tv"))
    return (
        f"| {case.name} | {count / case.batch:.0f} | {cpu_o * 1e3:.0f} | {cpu_t * 1e3:.0f} | {case.batch / cpu_o:.1f} "
        f"| {case.batch / cpu_t:.1f} | {cpu_o / cpu_t:.3f} | {wall_o / wall_t:.3f} |"
    )


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(case: Case, side: str, num_classes: int) -> None:
    """Runs in a fresh process: two training steps of one side; prints the peak RSS figures as JSON."""
    ours, tv = build_pair(case, num_classes)
    images, targets = make_batch(case, num_classes, torch.device("cpu"))
    ours.train()
    tv.train()
    before = _rss_kib()
    for _ in range(2):
        if side == "ours":
            ours.zero_grad(set_to_none=True)
            ours(images, targets).level_losses.sum().backward()
        else:
            tv.zero_grad(set_to_none=True)
            losses = tv(images, targets)
            (losses["classification"] + losses["bbox_regression"]).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"before_kib": before, "peak_kib": peak}))


def memory(case_index: int, args: argparse.Namespace) -> str:
    case = CASES[case_index]
    out = {}
    for side in ("ours", "torchvision"):
        cmd = [sys.executable, __file__, "--memory-child", side, "--case", str(case_index),
               "--num-classes", str(args.num_classes), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    rise = {k: (v["peak_kib"] - v["before_kib"]) / 1024 for k, v in out.items()}
    peak = {k: v["peak_kib"] / 1024 for k, v in out.items()}
    return (
        f"| {case.name} | {rise['ours']:.0f} | {rise['torchvision']:.0f} | {rise['ours'] / rise['torchvision']:.2f} "
        f"| {peak['ours']:.0f} | {peak['torchvision']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--score-thresh", type=float, default=0.005)
    parser.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))))
    parser.add_argument("--memory-child", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(CASES[args.case], "ours" if args.memory_child == "ours" else "tv", args.num_classes)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.num_classes} classes, {args.repeats} repeats")
    print(
        "\n| case | detections / image | ours CPU ms | torchvision CPU ms | ours img/s (CPU) | torchvision img/s (CPU) "
        "| ours / tv, CPU | ours / tv, wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i in args.cases:
        print(inference(CASES[i], args), flush=True)
    print("\n| case | ours MiB (peak − before) | torchvision MiB | ours / tv | ours peak MiB | torchvision peak MiB |")
    print("|---|---|---|---|---|---|")
    for i in args.cases:
        print(memory(i, args), flush=True)


if __name__ == "__main__":
    main()
