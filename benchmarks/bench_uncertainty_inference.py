"""What per-box uncertainty (``bbox_std``) and var voting cost at inference, side by side in one process.

Three models per detector with the same weights where they share them: plain; ``model.box_uncertainty``
(the head's extra α outputs, ``bbox_std`` through the box coder); and the same with ``model.var_voting``.
Each runs eval mode under ``torch.inference_mode()`` on one batch (``bench_train_step.py``'s random images,
80 classes, ResNet-18 FPN-64), alternating their order repeat by repeat; the median process CPU time (one
torch thread) of each, and the ratios to plain. ``--score-thresh`` (default 0.005, as
``bench_inference.py``) sends each level's top 1,000 candidates through NMS and voting, as a trained
model's busy image does; at random initialisation torchvision's 0.05 would leave them nothing.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_uncertainty_inference.py [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_train_step import CASES, Case, make_batch, make_cfg
from robustdet.config import config_from_dict
from robustdet.models import build_model

DETECTORS = ("retinanet", "fcos", "faster_rcnn")


def build_three(case: Case, name: str, num_classes: int, score_thresh: float) -> dict[str, torch.nn.Module]:
    base = make_cfg(case.size).model_dump(mode="json")
    base["model"].update(name=name, score_thresh=score_thresh)
    if name == "fcos":
        base["model"].pop("anchor_sizes")
        base["loss"]["box_loss"] = "giou"
    if name == "faster_rcnn":
        base["model"]["anchor_scales"] = [1.0]
        base["loss"]["box_loss"] = "smooth_l1"
    models = {}
    variants: dict[str, dict[str, bool]] = {
        "plain": {}, "bbox_std": {"box_uncertainty": True}, "voting": {"box_uncertainty": True, "var_voting": True}
    }
    for label, extra in variants.items():
        cfg = config_from_dict({**base, "model": {**base["model"], **extra}})
        torch.manual_seed(0)
        models[label] = build_model(cfg, num_classes).eval()
    for label in ("bbox_std", "voting"):  # the plain weights, the α layers at their init
        models[label].load_state_dict(models["plain"].state_dict(), strict=False)
    return models


def measure(case: Case, name: str, args: argparse.Namespace) -> str:
    models = build_three(case, name, args.num_classes, args.score_thresh)
    images, _ = make_batch(case, args.num_classes, torch.device("cpu"))
    with torch.inference_mode():
        out = {k: m(images) for k, m in models.items()}
    if "bbox_std" not in out["bbox_std"][0]:
        raise RuntimeError(f"{name}: model.box_uncertainty gives no bbox_std (no α head?)")
    count = sum(len(d["boxes"]) for d in out["plain"]) / case.batch
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for r in range(args.warmup + args.repeats):
        for label in order if r % 2 else order[::-1]:
            start = time.process_time()
            with torch.inference_mode():
                models[label](images)
            if r >= args.warmup:
                times[label].append(time.process_time() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    plain = med["plain"]
    return (
        f"| {name} | {case.name} | {count:.0f} | {plain * 1e3:.0f} | {med['bbox_std'] * 1e3:.0f} "
        f"| {med['voting'] * 1e3:.0f} | {med['bbox_std'] / plain - 1:+.1%} "
        f"| {(med['voting'] - med['bbox_std']) / plain:+.1%} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--score-thresh", type=float, default=0.005)
    parser.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))))
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.num_classes} classes, {args.repeats} repeats")
    print("\n| detector | case | detections / image | plain CPU ms | + bbox_std ms | + voting ms "
          "| bbox_std cost (of plain) | voting cost (of plain) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.detectors:
        for i in args.cases:
            print(measure(CASES[i], name, args), flush=True)


if __name__ == "__main__":
    main()
