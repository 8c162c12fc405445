"""``annotation_losses``: the per-anchor losses summed per annotation, against torchvision's matcher and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou
from torchvision.ops import sigmoid_focal_loss as tv_focal

from robustdet.models import PerLevelFCOS, build_model
from tests.test_models_fcos import tiny_cfg as fcos_cfg
from tests.test_models_retinanet import NUM_CLASSES, batch, build, independent_anchors, tiny_cfg


def captured(model, images, targets):
    """``annotation_losses`` with the resized targets and head outputs it used, caught by hooks."""
    seen: dict[str, object] = {}
    hooks = [
        model.transform.register_forward_hook(lambda _m, _i, out: seen.update(image_list=out[0], targets=out[1])),
        model.head.register_forward_hook(lambda _m, _i, out: seen.update(outputs=out)),
    ]
    try:
        result = model.annotation_losses(images, targets)
    finally:
        for h in hooks:
            h.remove()
    return result, seen


def test_retinanet_annotation_losses_equal_an_image_by_image_reference() -> None:
    """Per annotation j: Σ over the anchors torchvision's Matcher gives j of the focal loss (Σ_c) and the
    L1 of the deltas, and the count of those anchors. Image 3 holds a duplicate of its second box: the
    matcher gives ties to the first box, so the duplicate gets no anchor and both sums are 0."""
    cfg = tiny_cfg()
    model = build(cfg).eval()
    images, targets = batch()
    dup = targets[2]
    targets[2] = {k: torch.cat([dup[k], dup[k][1:2]]) for k in ("boxes", "labels")}
    result, seen = captured(model, images, targets)
    outputs, resized = seen["outputs"], seen["targets"]
    anchors, _, _ = independent_anchors(cfg, tuple(seen["image_list"].tensors.shape[-2:]), torch.float64)
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    assert len(result) == len(images)
    for b, (t, got) in enumerate(zip(resized, result, strict=True)):
        n = t["boxes"].shape[0]
        assert got["cls"].shape == got["box"].shape == got["anchors"].shape == (n,)
        assert got["anchors"].dtype == torch.int64
        if n == 0:
            continue
        matched = matcher(box_iou(t["boxes"], anchors))
        logits, deltas = outputs["cls_logits"][b], outputs["bbox_regression"][b]
        for j in range(n):
            mine = matched == j
            target = torch.zeros_like(logits[mine])
            target[:, t["labels"][j]] = 1.0
            cls = tv_focal(logits[mine], target, reduction="sum")
            enc = coder.encode_single(t["boxes"][j].expand(int(mine.sum()), 4), anchors[mine])
            box = F.l1_loss(deltas[mine], enc, reduction="sum")
            assert int(got["anchors"][j]) == int(mine.sum())
            torch.testing.assert_close(got["cls"][j], cls, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["box"][j], box, rtol=1e-10, atol=1e-12)
    assert int(result[2]["anchors"][-1]) == 0 and float(result[2]["box"][-1]) == 0.0
    assert all(int(a) > 0 for a in result[2]["anchors"][:-1])  # every other box gets its best anchors


def test_fcos_annotation_sums_add_up_to_the_training_loss() -> None:
    """FCOS, per_batch: Σ_j of the per-annotation box (and cls of the foreground) sums over the batch,
    divided by the foreground count, is the training loss's regression total; the anchor counts add up
    to that foreground count. In train mode both see the same head outputs."""
    torch.manual_seed(0)
    model = build_model(fcos_cfg(), NUM_CLASSES)
    assert isinstance(model, PerLevelFCOS)
    model = model.double().train()
    images, targets = batch()
    result = model.annotation_losses(images, targets)
    losses = model(images, targets)
    num_fg = sum(int(r["anchors"].sum()) for r in result)
    assert num_fg > 0
    box_total = sum(float(r["box"].sum()) for r in result) / num_fg
    assert abs(box_total - float(losses.components["reg"].sum())) < 1e-9 * max(1.0, box_total)
    assert all(not p.requires_grad for r in result for p in r.values())
