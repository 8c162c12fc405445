"""How often would the Background Recalibration Loss act on a trained detector, and on what?

For a finished RetinaNet run trained with dropped boxes (e.g. select.yaml's baseline at drop40), on its
first N training images: the anchors that its noisy labels make background (IoU < model.bg_iou_thresh to
every kept box), their highest class score p, and for each threshold τ the share of background elements
with p > τ (BRL's mask) and how many of those lie on a dropped object (IoU >= 0.5 to a dropped box: a
missing annotation, what BRL is for); and the share of dropped boxes with at least one anchor of their
class above τ (the missing objects BRL can reach at all).

    .venv/bin/python experiments/robust/brl_engagement.py runs/robust-select/method=baseline__noise=drop40__seed=100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.ops import box_iou

from robustdet.data.dataset import read_image
from robustdet.data.synthetic import load_synthetic
from robustdet.engine.inference import load_trained


def xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def scores_and_anchors(model: torch.nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor class probabilities [A, C] and anchors [A, 4] in input pixels (the cell keeps 96 px)."""
    seen: dict[str, object] = {}
    hooks = [model.transform.register_forward_hook(lambda _m, _i, out: seen.update(image_list=out[0])),
             model.head.register_forward_hook(lambda _m, inp, out: seen.update(features=inp[0], outputs=out))]
    try:
        with torch.no_grad():
            model([image])
    finally:
        for h in hooks:
            h.remove()
    anchors, _ = model.batch_anchors(seen["image_list"], seen["features"])
    return seen["outputs"]["cls_logits"][0].sigmoid(), anchors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--thresholds", default="0.1,0.3,0.5,0.7")
    args = parser.parse_args()
    loaded = load_trained(args.run / "checkpoints" / "last.pt")
    model, cfg = loaded.model, loaded.cfg
    dropped = set(json.loads((args.run / "label_noise.json").read_text())["changed"]["drop"])
    data, root = load_synthetic(cfg.data.synthetic, "train")
    label_of = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    taus = [float(t) for t in args.thresholds.split(",")]
    masked = dict.fromkeys(taus, 0)
    on_dropped = dict.fromkeys(taus, 0)
    reached = dict.fromkeys(taus, 0)
    n_background = n_dropped = 0
    for image in data["images"][: args.images]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        kept = torch.tensor([xyxy(a["bbox"]) for a in anns if a["id"] not in dropped]).reshape(-1, 4)
        lost = [a for a in anns if a["id"] in dropped]
        probs, anchors = scores_and_anchors(model, read_image(str(root / image["file_name"])).float() / 255)
        iou_kept = box_iou(anchors, kept).max(dim=1).values if len(kept) else torch.zeros(len(anchors))
        background = iou_kept < cfg.model.bg_iou_thresh
        lost_boxes = torch.tensor([xyxy(a["bbox"]) for a in lost]).reshape(-1, 4)
        on_lost = box_iou(anchors, lost_boxes) >= 0.5 if lost else torch.zeros(len(anchors), 0, dtype=torch.bool)
        n_background += int(background.sum()) * probs.shape[1]
        n_dropped += len(lost)
        for tau in taus:
            m = background[:, None] & (probs > tau)
            masked[tau] += int(m.sum())
            on_dropped[tau] += int((m & on_lost.any(dim=1)[:, None]).sum())
            for j, a in enumerate(lost):
                near = on_lost[:, j] & background
                reached[tau] += int(bool((probs[near, label_of[a["category_id"]]] > tau).any()))
    print(f"{args.run.name}: {args.images} training images, {n_background} background elements, "
          f"{n_dropped} dropped boxes")
    print(f"{'τ':>5} {'masked elements':>16} {'share':>9} {'on a dropped box':>17} {'dropped boxes reached':>22}")
    for tau in taus:
        share = masked[tau] / max(n_background, 1)
        frac = on_dropped[tau] / max(masked[tau], 1)
        print(f"{tau:>5.2f} {masked[tau]:>16} {share:>9.2e} {frac:>16.0%} {reached[tau] / max(n_dropped, 1):>21.0%}")


if __name__ == "__main__":
    main()
