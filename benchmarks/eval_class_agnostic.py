"""COCO metrics of a checkpoint with the classes merged: how much of the AP gap is classification?

Runs the model on ``data.val``, merges every detection and ground-truth box into one class (NMS across the
old classes at the model's NMS threshold) and evaluates with COCOeval. Compare with ``robustdet eval``:
a large gap means the detector finds the objects but names them wrongly (docs/benchmarks.md).

    .venv/bin/python benchmarks/eval_class_agnostic.py runs/demo/checkpoints/last.pt
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json

import torch
from pycocotools.coco import COCO
from torchvision.ops import batched_nms

from robustdet.data import build_dataset, build_eval_loader
from robustdet.engine.evaluator import coco_evaluate, to_coco_results
from robustdet.engine.inference import load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_trained(args.checkpoint)
    cfg = loaded.cfg
    dataset = build_dataset(cfg.data.val, cfg.data, train=False)
    model = loaded.model.eval()
    results, image_ids = [], []
    for images, targets in build_eval_loader(dataset, cfg.eval.batch_size, 0, max_images=cfg.eval.max_images):
        with torch.no_grad():
            dets = model([img.to(loaded.device).float() / 255 for img in images])
        for det, target in zip(dets, targets, strict=True):
            one = torch.zeros_like(det["labels"])
            keep = batched_nms(det["boxes"], det["scores"], one, cfg.model.nms_thresh)
            merged = {"boxes": det["boxes"][keep], "scores": det["scores"][keep], "labels": one[keep]}
            results += to_coco_results([merged], [int(target["image_id"])], dataset.category_ids)
            image_ids.append(int(target["image_id"]))
    gt = copy.deepcopy(dataset.coco.dataset)
    for ann in gt["annotations"]:
        ann["category_id"] = dataset.category_ids[0]
    gt["categories"] = [c for c in gt["categories"] if c["id"] == dataset.category_ids[0]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    bbox = coco_evaluate(coco, results, image_ids)["bbox"]
    print(json.dumps({"class_agnostic": {k: round(v, 1) for k, v in bbox.items()}}))


if __name__ == "__main__":
    main()
