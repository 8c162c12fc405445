"""Can the whole pipeline learn real images? Train and evaluate on the same 16 coco128 images.

Reads ../shared/data/coco128 (the original COCO json of train2017), keeps the first N images that have
boxes, trains a RetinaNet from random init on them and evaluates on the same images with COCOeval.
Overfitting is the point: a pipeline with a broken box coding, label mapping or evaluator cannot get
there. Prints the AP reached and the time taken.

    .venv/bin/python benchmarks/overfit_coco128.py --iters 400
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from robustdet.config import load_config
from robustdet.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"


def subset_json(src: Path, n: int, dst: Path) -> Path:
    data = json.loads(src.read_text())
    with_boxes = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)}
    images = [im for im in data["images"] if im["id"] in with_boxes][:n]
    keep = {im["id"] for im in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    dst.write_text(json.dumps(data))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--size", type=int, default=384, help="shorter image side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--method", default="baseline", choices=["baseline", "bayesian", "rlo", "bayesian_rlo"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="overfit-coco128-"))
    ann = subset_json(COCO128 / "annotations" / "instances_train2017.json", args.images, tmp / "subset.json")
    source = f"{{format: coco, path: {ann}, image_root: {COCO128 / 'images' / 'train2017'}}}"
    overrides = [
        f"model.backbone={args.backbone}", "model.fpn_channels=128", "model.head_norm=group_norm",
        f"model.min_size={args.size}", f"model.max_size={int(args.size * 1.667)}",
        "model.anchor_sizes=[32, 64, 128, 256, 512]",
        f"data.train={source}", f"data.val={source}", "data.empty_images=skip", "data.num_workers=2",
        "data.augment.hflip=false",
        f"train.max_iter={args.iters}", f"train.batch_size={args.batch}", f"train.device={args.device}",
        "train.optimizer.name=adamw", "train.optimizer.lr=0.0005", "train.optimizer.weight_decay=0.0",
        "train.schedule.name=cosine", "train.schedule.warmup_iters=50", "train.schedule.warmup_factor=0.01",
        "train.clip_grad_norm=10", "checkpoint.period=0", "log.period=20", "eval.batch_size=8",
        f"loss.bayesian={'true' if 'bayesian' in args.method else 'false'}",
        f"weighting.name={'rlo' if 'rlo' in args.method else 'equal'}", "weighting.interval=25",
    ]
    cfg = load_config(None, overrides)
    out = Path(args.out) if args.out else tmp / "run"
    t0 = time.perf_counter()
    metrics = Trainer(cfg, out).train()
    secs = time.perf_counter() - t0
    assert metrics is not None
    b = metrics["bbox"]
    print(json.dumps({"images": args.images, "iters": args.iters, "batch": args.batch, "size": args.size,
                      "method": args.method,
                      "AP": round(b["AP"], 1), "AP50": round(b["AP50"], 1), "seconds": round(secs, 1)}))


if __name__ == "__main__":
    main()
