"""What per-box uncertainty (``bbox_std``) and var voting cost at inference, side by side in one process.

Three models per detector with the same weights where they share them: plain; ``model.box_uncertainty``
(the head's extra α outputs, ``bbox_std`` through the box coder); and the same with ``model.var_voting``.
Each runs eval mode under ``torch.inference_mode()`` on one batch (``bench_train_step.py``'s random images,
80 classes, ResNet-18 FPN-64), alternating their order repeat by repeat; the median process CPU time (one
torch thread) of each. The whole forward's medians differ by a few percent from run to run on a shared
CPU, more than the costs measured, so the costs come from the parts that differ, timed the same way on
the inputs they got in one forward: the head (dense detectors) and the detection step
(``postprocess_detections``; Faster R-CNN's ``_detect``, box head included). bbox_std cost =
(α layers + Δ detection step) / plain forward, the α layers timed on their own (their convs, layout and
clamp on the towers captured in one forward: the difference of two whole heads, also printed, moved by
±10 ms from run to run at 2 x 512 px around a layer that takes about 6 ms); voting cost = (voting's
detection step − bbox_std's) / plain forward, each Δ the median over repeats of the difference measured
within one repeat (back to back: on a shared CPU the medians of the sides drift apart by more than the
costs, their paired differences less).
``--score-thresh`` (default 0.005, as ``bench_inference.py``) sends each level's top 1,000 candidates
through NMS and voting, as a trained model's busy image does; at random initialisation torchvision's 0.05
would leave them nothing.

``--stand-in-head`` replaces the α layers by α = clamp(½·regression) (no convolution): the cost of the
post-processing alone (σ through the coder, voting), without the head's extra outputs.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_uncertainty_inference.py [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from bench_train_step import CASES, Case, make_batch, make_cfg
from robustdet.config import config_from_dict
from robustdet.models import build_model
from robustdet.models.heads import clamp_log_var, per_anchor

DETECTORS = ("retinanet", "fcos", "faster_rcnn")


class StandInHead(torch.nn.Module):
    """The plain head plus α = clamp(½·regression): ``bbox_log_var`` at no convolution's cost."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head
        self.box_coder = getattr(head, "box_coder", None)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.head(features)
        out["bbox_log_var"] = (0.5 * out["bbox_regression"]).clamp(-7.0, 7.0)
        return out


class StandInPredictor(torch.nn.Module):
    def __init__(self, predictor: torch.nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, deltas = self.predictor(x)
        return logits, deltas, (0.5 * deltas).clamp(-7.0, 7.0)


def stand_in(model: torch.nn.Module) -> None:
    if hasattr(model, "roi_heads"):
        model.roi_heads.box_predictor = StandInPredictor(model.roi_heads.box_predictor)
    else:
        model.head = StandInHead(model.head)


COMMON_KEYS = ("backbone", "fpn_channels", "head_norm", "group_norm_groups", "min_size", "max_size")
# where each detector's outputs become detections: the part that bbox_std and voting change
DETECTION_STEP = {"retinanet": "postprocess_detections", "fcos": "postprocess_detections", "faster_rcnn": "_detect"}


def build_three(
    case: Case, name: str, num_classes: int, score_thresh: float, stand_in_head: bool
) -> dict[str, torch.nn.Module]:
    bench = make_cfg(case.size).model
    section = {k: getattr(bench, k) for k in COMMON_KEYS} | {"name": name, "score_thresh": score_thresh}
    if name != "fcos":
        section["anchor_sizes"] = bench.anchor_sizes
    # inference does not read the box loss; FCOS's per-box α needs a loss on deltas (l1), not its GIoU default
    loss = {"box_loss": {"retinanet": "l1", "fcos": "l1", "faster_rcnn": "smooth_l1"}[name]}
    models = {}
    variants: dict[str, dict[str, bool]] = {
        "plain": {}, "bbox_std": {"box_uncertainty": True}, "voting": {"box_uncertainty": True, "var_voting": True}
    }
    for label, extra in variants.items():
        cfg = config_from_dict({"model": {**section, **({} if stand_in_head else extra)}, "loss": loss})
        torch.manual_seed(0)
        models[label] = build_model(cfg, num_classes).eval()
        if label != "plain":  # the plain weights, the α layers at their init
            models[label].load_state_dict(models["plain"].state_dict(), strict=False)
        if stand_in_head and label != "plain":
            stand_in(models[label])
            models[label].var_voting_sigma_t = 0.02 if extra.get("var_voting") else None
    return models


def captured(model: torch.nn.Module, part: torch.nn.Module, method: str, images: list[torch.Tensor]) -> Callable:
    """``part.method`` again on the arguments it got in one eval forward of ``model`` on ``images``."""
    seen: dict[str, tuple] = {}
    original = getattr(part, method)

    def capture(*args: object) -> object:
        seen["args"] = args
        return original(*args)

    setattr(part, method, capture)
    try:
        with torch.inference_mode():
            model(images)
    finally:
        delattr(part, method)
    return lambda: original(*seen["args"])


def alpha_layers(model: torch.nn.Module, images: list[torch.Tensor]) -> Callable:
    """The α layers' own work in an eval forward of a dense ``model``, on the towers they read in one:
    the conv per level, the per-anchor layout and the clamp (all that ``model.box_uncertainty`` adds to
    the head; the towers are computed once for both layers)."""
    box_head = model.head.regression_head
    towers: list[torch.Tensor] = []
    hook = box_head.bbox_log_var.register_forward_pre_hook(lambda _module, args: towers.append(args[0]))
    try:
        with torch.inference_mode():
            model(images)
    finally:
        hook.remove()
    layer = box_head.bbox_log_var
    return lambda: clamp_log_var(torch.cat([per_anchor(layer(t), 4) for t in towers], 1), box_head.log_var_range)


def repeat_times(calls: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Process CPU time of each call in every repeat, the calls back to back in an order that alternates
    repeat by repeat (so a difference of two calls within one repeat shares the machine's state)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for r in range(args.warmup + args.repeats):
        for label in order if r % 2 else order[::-1]:
            start = time.process_time()
            with torch.inference_mode():
                calls[label]()
            if r >= args.warmup:
                times[label].append(time.process_time() - start)
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over repeats of time[a] − time[b], each difference within one repeat."""
    return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True))


def measure(case: Case, name: str, args: argparse.Namespace) -> str:
    models = build_three(case, name, args.num_classes, args.score_thresh, args.stand_in_head)
    images, _ = make_batch(case, args.num_classes, torch.device("cpu"))
    with torch.inference_mode():
        out = {k: m(images) for k, m in models.items()}
    if "bbox_std" not in out["bbox_std"][0]:
        raise RuntimeError(f"{name}: model.box_uncertainty gives no bbox_std (no α head?)")
    count = sum(len(d["boxes"]) for d in out["plain"]) / case.batch
    full = repeat_times({k: partial(m, images) for k, m in models.items()}, args)
    parts = {k: captured(m, m, DETECTION_STEP[name], images) for k, m in models.items()}
    dense = name != "faster_rcnn"  # Faster R-CNN's box head (and α layer) is inside _detect
    if dense:
        parts |= {f"head {k}": captured(m, m.head, "forward", images) for k, m in models.items()}
        if not args.stand_in_head:
            parts["alpha"] = alpha_layers(models["bbox_std"], images)
    part = repeat_times(parts, args)
    extra_head = paired(part, "head bbox_std", "head plain") if dense else 0.0
    alpha = statistics.median(part["alpha"]) if "alpha" in part else extra_head
    plain = statistics.median(full["plain"])
    std_cost = (alpha + paired(part, "bbox_std", "plain")) / plain
    vote_cost = paired(part, "voting", "bbox_std") / plain
    full_ms = {k: statistics.median(v) * 1e3 for k, v in full.items()}
    part_ms = {k: statistics.median(v) * 1e3 for k, v in part.items()}
    return (
        f"| {name} | {case.name} | {count:.0f} | {plain * 1e3:.0f} | {full_ms['bbox_std']:.0f} "
        f"| {full_ms['voting']:.0f} | {part_ms['plain']:.1f} / {part_ms['bbox_std']:.1f} / "
        f"{part_ms['voting']:.1f} | {extra_head * 1e3:+.1f} | {alpha * 1e3:.1f} | {std_cost:+.1%} | {vote_cost:+.1%} |"
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
    parser.add_argument("--stand-in-head", action="store_true", help="α without the head's layers (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    head = "stand-in α (post-processing only)" if args.stand_in_head else "the α head layers"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.num_classes} classes, {args.repeats} repeats, "
          f"{head}")
    print("\n| detector | case | detections / image | plain ms | bbox_std ms | voting ms "
          "| detection step ms (plain / bbox_std / voting) | head Δ ms (paired) | α layers ms | bbox_std cost "
          "| voting cost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.detectors:
        for i in args.cases:
            print(measure(CASES[i], name, args), flush=True)


if __name__ == "__main__":
    main()
