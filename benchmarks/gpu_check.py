"""The GPU check: robustdet against torchvision at COCO scale, in one run of under 5 minutes on one GPU.

Prints Markdown tables:

1. **Training step** of RetinaNet-R50-FPN at 1333x800 (the model section of
   ``configs/retinanet/_retinanet_r50_fpn_coco_1x.yaml``: FrozenBatchNorm, 3 trainable backbone stages;
   the "pretrained" weights are random ones written to a temporary file, nothing is downloaded), batch 2
   and 8, bf16 autocast on CUDA: forward + backward + SGD step, data already on the device, robustdet
   and torchvision's ``RetinaNet`` with identical weights alternating in every repeat
   (``bench_train_step.torchvision_twin``). Speed-up = torchvision ms / robustdet ms (goal: >= 1.25 at
   batch 8), images per second (anchor: detectron2's RetinaNet-R50 1x trains at about 9.8 images/s per
   V100), and each step's peak memory above what was allocated before it (activations, gradients,
   workspace; ``torch.cuda.max_memory_allocated``).
2. The same with **each method** on: ``loss.bayesian=true``, ``weighting.name`` avw / rlo, and uw / dwa
   when the config accepts them ('n/a' when it rejects the name). The baseline row uses torchvision's
   loss quantity (per-image normalisation, L1), checked equal to torchvision's before timing.
3. The **loss microbenchmark** (``bench_losses.bench_losses``, finite checks off as in training).
4. **Evaluation speed**: inference (transform, backbone, head, decoding, NMS; score threshold 0 so that
   random weights still feed NMS its full 1000 candidates per level) in eval mode, no_grad, autocast.

Run on a GPU: ``benchmarks/gpu_check.sh`` (this with ``--device cuda``). Smoke run on a CPU (tiny sizes,
ResNet-18, fp32, few repeats; the numbers mean nothing): ``python benchmarks/gpu_check.py --device cpu
--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from torch import nn

from bench_losses import bench_losses, print_losses
from bench_train_step import Case, alternate, make_batch, torchvision_twin
from robustdet.config import Config, config_from_dict
from robustdet.errors import ConfigError
from robustdet.losses import set_finite_checks
from robustdet.models import PerLevelRetinaNet, build_model
from robustdet.weighting import build_weighting

REPO = Path(__file__).resolve().parents[1]
R50_CONFIG = REPO / "configs" / "retinanet" / "_retinanet_r50_fpn_coco_1x.yaml"
DETECTRON2_IMAGES_PER_S_V100 = 9.8  # detectron2 model zoo, RetinaNet R50-FPN 1x: 0.205 s/iter, 2 images/GPU
GOAL_SPEEDUP = 1.25
MiB = 2**20
_highest_peak = 0  # bytes: the highest torch.cuda.max_memory_allocated seen (both models resident)

# label -> config changes on top of the baseline; names the config rejects are reported as n/a
METHODS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "bayesian": {"loss": {"bayesian": True, "box_loss": "smooth_l1", "beta": 0.1}},
    "avw": {"weighting": {"name": "avw"}},
    "rlo": {"weighting": {"name": "rlo"}},
    "uw": {"weighting": {"name": "uw"}},
    "dwa": {"weighting": {"name": "dwa"}},
}


@dataclass(frozen=True)
class Setup:
    backbone: str
    fpn_channels: int
    width: int
    height: int
    batches: tuple[int, ...]
    repeats: int
    method_repeats: int
    warmup: int
    boxes_per_image: int
    loss_anchors_per_image: int
    loss_repeats: int


FULL = Setup("resnet50", 256, 1333, 800, (2, 8), 10, 6, 3, 8, 50_000, 30)
QUICK = Setup("resnet18", 32, 128, 64, (1, 2), 2, 1, 1, 3, 2_000, 2)


def model_section(setup: Setup, weights: Path) -> dict[str, Any]:
    """The R50 COCO config's model section, at this setup's sizes, with local (random) backbone weights."""
    model = dict(yaml.safe_load(R50_CONFIG.read_text())["model"])
    model.update(
        backbone=setup.backbone,
        backbone_weights=str(weights),
        fpn_channels=setup.fpn_channels,
        min_size=min(setup.width, setup.height),
        max_size=max(setup.width, setup.height),
    )
    return model


def method_config(model: dict[str, Any], method: str) -> Config:
    """Baseline: torchvision's loss quantity (per-image normalisation, L1), so the twin is comparable."""
    data: dict[str, Any] = {"model": model, "loss": {"normalization": "per_image", "box_loss": "l1"}}
    for section, changes in METHODS[method].items():
        data[section] = {**data.get(section, {}), **changes}
    return config_from_dict(data, f"gpu_check method {method}")


def peak_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory one call allocates above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    global _highest_peak
    peak = torch.cuda.max_memory_allocated(device)
    _highest_peak = max(_highest_peak, peak)
    return (peak - before) / MiB


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


class Deadline:
    """Rows left when the time budget is spent are reported as skipped, so the check ends in time."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


@contextlib.contextmanager
def random_backbone_weights(backbone: str) -> Iterator[Path]:
    """A torchvision classification state dict with random weights, as if downloaded (nothing is)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{backbone}.pth"
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, backbone)().state_dict(), path)
        yield path


def train_rows(
    setup: Setup, args: argparse.Namespace, device: torch.device, deadline: Deadline, notes: list[str]
) -> list[str]:
    """The table's rows (printed as they come); why a method is n/a goes to ``notes``."""
    amp = device.type == "cuda" and not args.no_amp
    rows: list[str] = []
    with random_backbone_weights(setup.backbone) as weights:
        model = model_section(setup, weights)
        torch.manual_seed(0)
        base_cfg = method_config(model, "baseline")
        base = build_model(base_cfg, args.num_classes)
        assert isinstance(base, PerLevelRetinaNet)
        tv = torchvision_twin(base, base_cfg, args.num_classes).to(device).train()
        base_state = base.state_dict()
        del base
        tv_opt = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)

        for method in METHODS:
            try:
                cfg = method_config(model, method)
            except ConfigError as exc:
                first = str(exc).splitlines()[0]
                rows.append(f"| {method} | all | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
                print(rows[-1], flush=True)
                notes.append(f"{method}: n/a, {first}")
                continue
            torch.manual_seed(0)
            ours = build_model(cfg, args.num_classes)
            ours.load_state_dict(base_state, strict=False)  # identical weights; log-variances are extra
            ours.to(device).train()
            levels = len(ours.level_names)
            weighting = build_weighting(cfg.weighting, levels, cfg.seed).to(device)
            params = [p for p in ours.parameters() if p.requires_grad] + list(weighting.parameters())
            ours_opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
            for batch in setup.batches:
                if deadline.passed():
                    rows.append(f"| {method} | {batch} | skipped (time budget) | | | | | | |")
                    print(rows[-1], flush=True)
                    continue
                case = Case(f"{batch}x{setup.width}x{setup.height}", batch, setup.width, setup.boxes_per_image,
                            setup.height)  # fmt: skip
                images, targets = make_batch(case, args.num_classes, device)
                if method == "baseline":
                    check_same_loss(ours, tv, images, targets)

                def step_ours(
                    ours: nn.Module = ours, weighting: Any = weighting, opt: Any = ours_opt,
                    images: Any = images, targets: Any = targets,
                ) -> None:  # fmt: skip
                    opt.zero_grad(set_to_none=True)
                    with autocast(device, amp):
                        out = ours(images, targets)
                    level_losses = out.level_losses.float()
                    (weighting.combine(level_losses) + out.extra_loss.float()).backward()
                    opt.step()
                    weighting.step(level_losses.detach())

                def step_tv(images: Any = images, targets: Any = targets) -> None:
                    tv_opt.zero_grad(set_to_none=True)
                    with autocast(device, amp):
                        losses = tv(images, targets)
                    (losses["classification"].float() + losses["bbox_regression"].float()).backward()
                    tv_opt.step()

                repeats = setup.repeats if method == "baseline" else setup.method_repeats
                try:
                    ms_ours, ms_tv = alternate(step_ours, step_tv, repeats, setup.warmup, device)
                    mem_ours, mem_tv = peak_mib(step_ours, device), peak_mib(step_tv, device)
                except torch.cuda.OutOfMemoryError:
                    rows.append(f"| {method} | {batch} | OOM | | | | | | |")
                    print(rows[-1], flush=True)
                    torch.cuda.empty_cache()
                    continue
                rows.append(
                    f"| {method} | {batch} | {ms_ours:.1f} | {ms_tv:.1f} | {ms_tv / ms_ours:.2f} | "
                    f"{1e3 * batch / ms_ours:.1f} | {1e3 * batch / ms_tv:.1f} | {fmt(mem_ours, 0)} | {fmt(mem_tv, 0)} |"
                )
                print(rows[-1], flush=True)
            del ours, ours_opt, weighting
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def check_same_loss(ours: nn.Module, tv: nn.Module, images: Any, targets: Any) -> None:
    """Timing the two means something only if they compute the same loss (fp32, same weights, same batch)."""
    with torch.no_grad():
        a = float(ours(images, targets).level_losses.sum())
        losses = tv(images, targets)
        b = float(losses["classification"] + losses["bbox_regression"])
    if abs(a - b) > 1e-3 * abs(b):
        raise RuntimeError(f"the losses differ: robustdet {a} vs torchvision {b}")


def eval_rows(setup: Setup, args: argparse.Namespace, device: torch.device, deadline: Deadline) -> list[str]:
    amp = device.type == "cuda" and not args.no_amp
    batch = setup.batches[-1]
    if deadline.passed():
        return [f"| eval | {batch} | skipped (time budget) | | | | | | |"]
    with random_backbone_weights(setup.backbone) as weights:
        model = model_section(setup, weights)
        model["score_thresh"] = 0.0
        cfg = method_config(model, "baseline")
        torch.manual_seed(0)
        ours = build_model(cfg, args.num_classes)
        assert isinstance(ours, PerLevelRetinaNet)
        tv = torchvision_twin(ours, cfg, args.num_classes)
    # the twin's post-processing with the config's settings (torchvision's defaults keep 300 detections)
    m = cfg.model
    tv.score_thresh, tv.nms_thresh = m.score_thresh, m.nms_thresh
    tv.detections_per_img, tv.topk_candidates = m.detections_per_img, m.topk_candidates
    ours.to(device).eval()
    tv.to(device).eval()
    case = Case("eval", batch, setup.width, setup.boxes_per_image, setup.height)
    images, _ = make_batch(case, args.num_classes, device)

    def infer(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(device, amp):
                model(images)

        return run

    ms_ours, ms_tv = alternate(infer(ours), infer(tv), setup.repeats, setup.warmup, device)
    mem_ours, mem_tv = peak_mib(infer(ours), device), peak_mib(infer(tv), device)
    return [
        f"| eval | {batch} | {ms_ours:.1f} | {ms_tv:.1f} | {ms_tv / ms_ours:.2f} | {1e3 * batch / ms_ours:.1f} | "
        f"{1e3 * batch / ms_tv:.1f} | {fmt(mem_ours, 0)} | {fmt(mem_tv, 0)} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run)")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too (bf16 autocast by default)")
    parser.add_argument("--budget-s", type=float, default=220.0, help="skip the rows left after this long")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu --quick for a smoke run)")
    previous = set_finite_checks(False)  # as the trainer runs the losses
    try:
        report(args, device)
    finally:  # a caller in the same process (the tests) gets its checks back
        set_finite_checks(previous)


def report(args: argparse.Namespace, device: torch.device) -> None:
    """Print the three tables (training step, losses, evaluation) and the goal's verdict."""
    setup = QUICK if args.quick else FULL
    deadline = Deadline(args.budget_s)
    started = time.perf_counter()
    amp = device.type == "cuda" and not args.no_amp
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# robustdet GPU check: {name}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{'bf16 autocast' if amp else 'fp32'}, {'quick' if args.quick else 'full'} "
        f"({setup.backbone}-FPN{setup.fpn_channels}, {setup.width}x{setup.height}, {args.num_classes} classes)"
    )

    print("\n## Training step (forward + backward + SGD), robustdet vs torchvision\n")
    print(
        "| method | batch | robustdet ms | torchvision ms | speed-up | robustdet img/s | torchvision img/s | "
        "robustdet peak MiB | torchvision peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    rows = train_rows(setup, args, device, deadline, notes)
    if notes:
        print("\n" + "\n".join(notes))
    big = max(setup.batches)
    baseline = [r for r in rows if r.startswith(f"| baseline | {big} |") and "skipped" not in r and "OOM" not in r]
    if baseline:
        speedup = float(baseline[0].split("|")[5])
        verdict = "met" if speedup >= GOAL_SPEEDUP else "NOT met"
        print(
            f"\ngoal: speed-up >= {GOAL_SPEEDUP} at batch {big}: {speedup:.2f}, {verdict}"
            f"{' (a --quick smoke run: not the setting of the goal)' if args.quick else ''}; anchor: detectron2 "
            f"RetinaNet-R50 1x trains at about {DETECTRON2_IMAGES_PER_S_V100} img/s per V100"
        )

    print("\n## Losses (bench_losses: forward + backward, finite checks off)\n")
    if deadline.passed():
        print("skipped (time budget)")
    else:
        print_losses(
            bench_losses(
                repeats=setup.loss_repeats, device=args.device, anchors_per_image=setup.loss_anchors_per_image,
                finite_checks=False,
            )
        )  # fmt: skip

    print("\n## Evaluation (inference: eval mode, no_grad, score threshold 0)\n")
    print(
        "| what | batch | robustdet ms | torchvision ms | speed-up | robustdet img/s | torchvision img/s | "
        "robustdet peak MiB | torchvision peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in eval_rows(setup, args, device, deadline):
        print(row)

    if device.type == "cuda":
        print(f"\nhighest torch.cuda.max_memory_allocated (both models resident): {_highest_peak / MiB:.0f} MiB")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
