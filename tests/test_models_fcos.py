"""Per-level FCOS: batched assignment, per-level losses equal to torchvision's, Bayesian terms, eval, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as tv_focal

from robustdet.cli import main
from robustdet.config import Config, config_from_dict, load_config
from robustdet.models import DETECTORS, DetectorLosses, PerLevelFCOS, build_model
from robustdet.models.backbones import build_backbone
from robustdet.models.fcos import assign_points, fcos_range_bounds
from robustdet.models.matching import pad_boxes
from tests.bayesian_reference import check_derivatives, eq14, eq14_ds, eq16, eq16_ds
from tests.conftest import REPO, tiny_overrides

NUM_CLASSES = 3
# the regression ranges of the small-image tests: (0, 16), (16, 24), (24, 40), (40, 56), (56, ∞)
SMALL_SIZES = [8, 16, 24, 40, 56]
SMALL_BOUNDS = [0.0, 16.0, 24.0, 40.0, 56.0, math.inf]  # written out, not the model's range_bounds


def tiny_cfg(anchor_sizes: list[float] | None = None, **loss: object) -> Config:
    if loss.get("bayesian"):  # these tests check Eq. 14 / 16 as written: the paper form, not the default
        loss.setdefault("bayesian_form", "paper")
    model: dict[str, object] = {
        "name": "fcos",
        "backbone": "resnet18",
        "fpn_channels": 16,
        "head_norm": "group_norm",
        "group_norm_groups": 4,
        "min_size": 160,
        "max_size": 192,
    }
    if anchor_sizes is not None:  # the lower ends of the ranges: the boundaries are anchor_sizes[1:]
        model["regression_ranges"] = anchor_sizes[1:]
    return config_from_dict({"model": model, "loss": {"box_loss": "giou", "normalization": "per_batch", **loss}})


def build(cfg: Config, seed: int = 0) -> PerLevelFCOS:
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_CLASSES)
    assert isinstance(model, PerLevelFCOS)
    # larger head weights than the 0.01 init, so losses and gradients are far from trivial
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # distances of about one stride: the ReLU'd (l, t, r, b) are then mostly > 0, so GIoU sees real
        # boxes (an all-zero prediction is a point, GIoU loss exactly 1 and no gradient)
        model.head.regression_head.bbox_reg.bias.add_(1.0)
    return model.double().train()


def batch(empty: bool = False) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Three images of 160-176 px with 0, 1 and 7 boxes, from 8 px to nearly the whole image."""
    g = torch.Generator().manual_seed(1)
    images = [
        torch.rand(3, h, w, generator=g, dtype=torch.float64) for h, w in [(160, 176), (168, 160), (160, 160)]
    ]
    boxes = [
        torch.zeros((0, 4)),
        torch.tensor([[6.0, 8.0, 150.0, 158.0]]),
        torch.tensor(
            [
                [2.0, 3.0, 12.0, 14.0],
                [22.0, 23.0, 52.0, 51.0],
                [60.0, 12.0, 124.0, 70.0],
                [30.0, 60.0, 110.0, 150.0],
                [96.0, 100.0, 104.0, 108.0],
                [96.0, 100.0, 104.0, 108.0],  # a duplicate: equal areas, the first one wins
                [20.0, 20.0, 110.0, 110.0],
            ]
        ),
    ]
    labels = [torch.zeros(0, dtype=torch.int64), torch.tensor([2]), torch.tensor([0, 1, 2, 0, 1, 2, 1])]
    if empty:
        boxes, labels = [b[:0] for b in boxes], [lab[:0] for lab in labels]
    targets = [{"boxes": b.double(), "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
    return images, targets


def torchvision_twin(model: PerLevelFCOS, cfg: Config) -> FCOS:
    """A plain torchvision FCOS (its own default points) of the same architecture, with our state dict."""
    m = cfg.model
    norm = lambda c: nn.GroupNorm(m.group_norm_groups, c)  # noqa: E731
    head = FCOSHead(m.fpn_channels, 1, NUM_CLASSES, num_convs=0)
    head.classification_head = FCOSClassificationHead(m.fpn_channels, 1, NUM_CLASSES, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(m.fpn_channels, 1, norm_layer=norm)
    tv = FCOS(
        build_backbone(m, "p3p7_from_p5"),
        NUM_CLASSES,
        min_size=m.min_size,
        max_size=m.max_size,
        head=head,
        score_thresh=m.score_thresh,
        nms_thresh=m.nms_thresh,
        detections_per_img=m.detections_per_img,
        topk_candidates=m.topk_candidates,
    )
    tv.load_state_dict(model.state_dict())
    return tv.double().train(model.training)


STRIDES = (8, 16, 32, 64, 128)  # P3-P7


def independent_points(padded: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, list[int], list[tuple[int, int]]]:
    """torchvision's FCOS "anchors" (one square of the level's stride per location) [A, 4], locations per
    level and feature-map sizes of a padded batch, without the model: ceil(H/s) x ceil(W/s) per level."""
    h, w = padded
    grid = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    generator = AnchorGenerator(tuple((float(s),) for s in STRIDES), ((1.0,),) * len(STRIDES))
    maps = [torch.zeros(1, 1, gh, gw, dtype=dtype) for gh, gw in grid]
    points = generator(ImageList(torch.zeros(1, 3, h, w, dtype=dtype), [(h, w)]), maps)[0]
    return points, [gh * gw for gh, gw in grid], grid


def head_pass(model: PerLevelFCOS, images: list[Tensor], targets: list[dict[str, Tensor]]):
    """The training forward, with what went into the loss captured through hooks on the public
    ``transform`` and ``head``, and points / level counts derived independently of the model."""
    seen: dict[str, object] = {}
    hooks = [
        model.transform.register_forward_hook(lambda _m, _i, out: seen.update(image_list=out[0], targets=out[1])),
        model.head.register_forward_hook(lambda _m, inp, out: seen.update(features=inp[0], outputs=out)),
    ]
    try:
        losses = model(images, targets)
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(losses, DetectorLosses)
    outputs = seen["outputs"]
    points, counts, grid = independent_points(tuple(seen["image_list"].tensors.shape[-2:]), outputs["cls_logits"].dtype)
    assert [tuple(f.shape[-2:]) for f in seen["features"]] == grid, "feature maps are not P3-P7 in order"
    return losses, seen["targets"], outputs, points, counts


def synthetic_head(size: int, seed: int = 0) -> tuple[dict[str, Tensor], Tensor, list[int], list[dict[str, Tensor]]]:
    """Random head outputs, points and boxes of every scale on a padded [size, size] batch of two images,
    without a backbone: enough locations for every level to get foreground, in float64."""
    g = torch.Generator().manual_seed(seed)
    points, counts, _ = independent_points((size, size), torch.float64)
    a = points.shape[0]
    outputs = {
        "cls_logits": torch.randn(2, a, NUM_CLASSES, generator=g, dtype=torch.float64) - 2,
        "bbox_regression": torch.rand(2, a, 4, generator=g, dtype=torch.float64) * 6,
        "bbox_ctrness": torch.randn(2, a, 1, generator=g, dtype=torch.float64),
    }
    targets = []
    for n in (40, 7):
        # sizes log-uniform from 6 px to the whole image, placed anywhere they fit
        wh = torch.exp(torch.rand(n, 2, generator=g, dtype=torch.float64) * math.log(size / 6)) * 6
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        boxes[-1] = boxes[-2]  # exact duplicate: a tie the first box must win
        targets.append({"boxes": boxes, "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g)})
    return outputs, points, counts, targets


def tv_matched_idxs(tv: FCOS, targets, outputs, points: Tensor, counts: list[int]) -> list[Tensor]:
    """torchvision's own per-image assignment, captured from inside ``FCOS.compute_loss``."""
    captured: list[Tensor] = []
    head_loss = tv.head.compute_loss

    def capture(targets, head_outputs, anchors, matched_idxs):
        captured.extend(matched_idxs)
        return head_loss(targets, head_outputs, anchors, matched_idxs)

    tv.head.compute_loss = capture  # type: ignore[method-assign]
    try:
        tv.compute_loss(targets, outputs, [points] * len(targets), counts)
    finally:
        del tv.head.compute_loss
    return captured


def reference_levels(
    targets, outputs, points: Tensor, counts: list[int], bounds: list[float], box_loss: str, beta: float,
    normalization: str,
    s_cls: float | None = None,
    s_reg: float | None = None,
    d_ds: bool = False,
) -> dict[str, Tensor]:
    """Per-level cls, reg and ctr image by image: torchvision's assignment code with the levels' ranges
    taken from ``bounds``, torchvision.ops / torch.nn.functional losses on the foreground only.

    With ``s_cls`` / ``s_reg`` the focal and smooth L1 terms are Eq. 16 / Eq. 14 (``bayesian_reference``;
    centerness stays the plain BCE); with ``d_ds`` too, cls and reg are their derivatives in s instead.
    """
    bayesian = s_cls is not None and s_reg is not None
    assert bayesian or not d_ds
    coder = det_utils.BoxLinearCoder(normalize_by_size=True)
    level = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    lower = torch.tensor(bounds[:-1], dtype=points.dtype)[level]
    upper = torch.tensor(bounds[1:], dtype=points.dtype)[level]
    centers = (points[:, :2] + points[:, 2:]) / 2
    sizes = points[:, 2] - points[:, 0]
    sums: dict[str, list[Tensor]] = {"cls": [], "reg": [], "ctr": []}
    nfg = []
    for t, logits, dist, ctr in zip(
        targets, outputs["cls_logits"], outputs["bbox_regression"], outputs["bbox_ctrness"], strict=True
    ):
        boxes = t["boxes"]
        if boxes.numel() == 0:
            matched = torch.full((points.shape[0],), -1, dtype=torch.int64)
        else:
            gt_centers = (boxes[:, :2] + boxes[:, 2:]) / 2
            match = (centers[:, None, :] - gt_centers[None]).abs().max(dim=2).values < 1.5 * sizes[:, None]
            x, y = centers.unsqueeze(2).unbind(1)
            x0, y0, x1, y1 = boxes.unsqueeze(0).unbind(2)
            d = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
            match &= d.min(dim=2).values > 0
            far = d.max(dim=2).values
            match &= (far > lower[:, None]) & (far < upper[:, None])
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            best, matched = (match.to(torch.float32) * (1e8 - areas[None])).max(dim=1)
            matched[best < 1e-5] = -1
        fg = matched >= 0
        onehot = torch.zeros_like(logits)
        onehot[fg, t["labels"][matched[fg]]] = 1.0
        if bayesian:
            per = {"cls": (eq16_ds if d_ds else eq16)(logits, onehot, s_cls).sum(1)}
        else:
            per = {"cls": tv_focal(logits, onehot, reduction="none").sum(1)}
        gt, p = boxes[matched[fg]], points[fg]
        reg = torch.zeros(points.shape[0], dtype=logits.dtype)
        if box_loss == "giou":
            reg[fg] = generalized_box_iou_loss(coder.decode(dist[fg], p), gt, eps=1e-7)
        elif bayesian:
            assert box_loss == "smooth_l1"
            reg[fg] = (eq14_ds if d_ds else eq14)(dist[fg] - coder.encode(p, gt), s_reg, beta).sum(1)
        else:
            reg[fg] = F.smooth_l1_loss(dist[fg], coder.encode(p, gt), beta=beta, reduction="none").sum(1)
        enc = coder.encode(p, gt)
        lr, tb = enc[:, [0, 2]], enc[:, [1, 3]]
        ctr_t = torch.sqrt(lr.min(1).values / lr.max(1).values * (tb.min(1).values / tb.max(1).values))
        ctr_l = torch.zeros(points.shape[0], dtype=logits.dtype)
        ctr_l[fg] = F.binary_cross_entropy_with_logits(ctr[fg, 0], ctr_t, reduction="none")
        per.update(reg=reg, ctr=ctr_l)
        for k, v in per.items():
            sums[k].append(torch.zeros(len(counts), dtype=logits.dtype).index_add(0, level, v))
        nfg.append(int(fg.sum()))
    out = {}
    for k, v in sums.items():
        s = torch.stack(v)
        if normalization == "per_image":
            out[k] = (s / torch.tensor(nfg, dtype=s.dtype).clamp(min=1)[:, None]).mean(0)
        else:
            out[k] = s.sum(0) / max(1, sum(nfg))
    return out


TIGHT = {"rtol": 1e-9, "atol": 1e-12}

# --- assignment ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_assignment_equals_torchvision(seed: int) -> None:
    outputs, points, counts, targets = synthetic_head(1024, seed)
    targets.append({"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int64)})
    outputs = {k: torch.cat([v, v[:1]]) for k, v in outputs.items()}
    model = build(tiny_cfg())
    expected = tv_matched_idxs(torchvision_twin(model, tiny_cfg()), targets, outputs, points, counts)
    gt_boxes, _, gt_valid = pad_boxes([t["boxes"] for t in targets], [t["labels"] for t in targets])
    lower, upper = model.point_ranges(counts, torch.float64, points.device)
    ours = assign_points(points, counts, gt_boxes, gt_valid, lower, upper)
    for i, e in enumerate(expected):
        assert torch.equal(ours[i], e), i
    level = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    assert set(level[ours[0] >= 0].tolist()) == {0, 1, 2, 3, 4}, "every level should get foreground"
    assert (ours[2] == -1).all()


def test_range_bounds() -> None:
    # the defaults are torchvision's 4x and 8x the point size (8, ..., 128), open-ended at both ends
    assert fcos_range_bounds([64, 128, 256, 512]) == [0, 64, 128, 256, 512, math.inf]
    assert build(tiny_cfg(SMALL_SIZES)).range_bounds == [0, 16, 24, 40, 56, math.inf]
    with pytest.raises(ValueError, match="increasing"):
        build_model(tiny_cfg([8, 16, 16, 64, 128]), NUM_CLASSES)
    with pytest.raises(ValueError, match="one bound per level"):
        build_model(tiny_cfg([8, 16, 32]), NUM_CLASSES)


# --- equivalence with torchvision ----------------------------------------------------------------------


@pytest.mark.parametrize("empty", [False, True])
def test_level_losses_sum_to_torchvision(empty: bool) -> None:
    cfg = tiny_cfg()
    model = build(cfg)
    tv = torchvision_twin(model, cfg)
    images, targets = batch(empty)
    ours = model(images, targets)
    theirs = tv(images, targets)
    assert isinstance(ours, DetectorLosses)
    assert ours.level_names == ["P3", "P4", "P5", "P6", "P7"]
    assert ours.level_losses.shape == (5,) and ours.level_losses.requires_grad
    assert set(ours.components) == {"cls", "reg", "ctr"}
    assert not any(c.requires_grad for c in ours.components.values())
    torch.testing.assert_close(ours.level_losses, sum(ours.components.values()), **TIGHT)
    for comp, key in (("cls", "classification"), ("reg", "bbox_regression"), ("ctr", "bbox_ctrness")):
        torch.testing.assert_close(ours.components[comp].sum(), theirs[key], **TIGHT)
    torch.testing.assert_close(ours.level_losses.sum(), sum(theirs.values()), **TIGHT)
    assert float(ours.extra_loss) == 0.0 and ours.extra_components == {}
    if not empty:
        assert int((ours.components["reg"] > 0).sum()) >= 2, "the batch should put foreground on P3 and P4"


def test_loss_at_scale_equals_torchvision() -> None:
    """Head outputs of a 1024 px batch (foreground on all five levels) through both loss functions."""
    outputs, points, counts, targets = synthetic_head(1024)
    cfg = tiny_cfg()
    model = build(cfg)
    ours = model.compute_level_losses(targets, outputs, points, counts)
    theirs = torchvision_twin(model, cfg).compute_loss(targets, outputs, [points] * 2, counts)
    torch.testing.assert_close(ours.level_losses.sum(), sum(theirs.values()), **TIGHT)
    assert (ours.components["reg"] > 0).all()


def test_gradients_match_torchvision() -> None:
    cfg = tiny_cfg()
    model = build(cfg)
    tv = torchvision_twin(model, cfg)
    images, targets = batch()
    model(images, targets).level_losses.sum().backward()
    sum(tv(images, targets).values()).backward()
    ours_grads = dict(model.named_parameters())
    for name, p in tv.named_parameters():
        assert torch.isfinite(ours_grads[name].grad).all(), name
        torch.testing.assert_close(ours_grads[name].grad, p.grad, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    ("normalization", "box_loss", "beta"),
    [("per_batch", "giou", 0.1), ("per_image", "smooth_l1", 0.1), ("per_batch", "l1", 0.0)],
)
def test_each_level_against_a_per_image_reference(normalization: str, box_loss: str, beta: float) -> None:
    """Small images with the SMALL_SIZES ranges, so all five levels get foreground from a real model."""
    cfg = tiny_cfg(SMALL_SIZES, normalization=normalization, box_loss=box_loss, beta=max(beta, 0.1), cls_weight=0.7)
    model = build(cfg)
    images, targets = batch()
    forward, t, outputs, points, counts = head_pass(model, images, targets)
    ref = reference_levels(t, outputs, points, counts, SMALL_BOUNDS, box_loss, beta, normalization)
    assert (ref["reg"] > 0).all(), "every level should have foreground"
    for ours in (forward, model.compute_level_losses(t, outputs, points, counts)):
        torch.testing.assert_close(ours.components["cls"], 0.7 * ref["cls"], **TIGHT)
        torch.testing.assert_close(ours.components["reg"], ref["reg"], **TIGHT)
        torch.testing.assert_close(ours.components["ctr"], ref["ctr"], **TIGHT)


# --- Bayesian ------------------------------------------------------------------------------------------


S_CLS, S_REG = 0.7, -0.4  # away from s = 0, where Eq. 16 is the plain focal loss


def bayes_cfg(s_cls: float, s_reg: float, **loss: object) -> Config:
    init = {"cls": s_cls, "reg": s_reg}
    return tiny_cfg(SMALL_SIZES, bayesian=True, box_loss="smooth_l1", beta=0.1, log_var_init=init, **loss)


def log_vars(model: PerLevelFCOS) -> tuple[float, float]:
    """s_cls, s_reg as the model holds them (0.7 is not a float32: the reference takes the stored value)."""
    assert model.log_variances is not None
    return float(model.log_variances["cls"].detach()), float(model.log_variances["reg"].detach())


def test_bayesian_cls_with_s_zero_is_the_focal_baseline() -> None:
    model = build(bayes_cfg(0.0, 1.0))
    assert model.log_variances is not None and model.log_variances.as_dict() == {"cls": 0.0, "reg": 1.0}
    baseline = build(tiny_cfg(SMALL_SIZES, box_loss="smooth_l1", beta=0.1), seed=1)
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("log_variances.") for k in unexpected)
    images, targets = batch()
    b, t, outputs, points, counts = head_pass(model, images, targets)
    f = baseline(images, targets)
    torch.testing.assert_close(b.components["cls"], f.components["cls"], **TIGHT)
    torch.testing.assert_close(b.components["ctr"], f.components["ctr"], **TIGHT)  # centerness is never Bayesian
    # s_reg = 1: the regression term is Eq. 14, level by level
    ref = reference_levels(t, outputs, points, counts, SMALL_BOUNDS, "smooth_l1", 0.1, "per_batch", 0.0, 1.0)
    torch.testing.assert_close(b.components["reg"], ref["reg"], **TIGHT)


@pytest.mark.parametrize(("normalization", "cls_weight"), [("per_batch", 0.7), ("per_image", 1.0)])
def test_bayesian_levels_are_eq16_and_eq14(normalization: str, cls_weight: float) -> None:
    """At s_cls = 0.7, s_reg = −0.4 each level's cls and reg term against Eq. 16 and Eq. 14 written out
    in float64 (``bayesian_reference``), centerness the plain BCE, points and level counts derived
    independently; SMALL_SIZES put foreground on every level."""
    model = build(bayes_cfg(S_CLS, S_REG, normalization=normalization, cls_weight=cls_weight))
    s_cls, s_reg = log_vars(model)
    assert (s_cls, s_reg) == (pytest.approx(S_CLS), pytest.approx(S_REG))
    images, targets = batch()
    ours, t, outputs, points, counts = head_pass(model, images, targets)
    with torch.no_grad():
        ref = reference_levels(t, outputs, points, counts, SMALL_BOUNDS, "smooth_l1", 0.1, normalization, s_cls, s_reg)
        plain = reference_levels(t, outputs, points, counts, SMALL_BOUNDS, "smooth_l1", 0.1, normalization)
    assert (ref["reg"] != 0).all(), "every level should have foreground"
    assert not torch.allclose(ref["cls"], plain["cls"], rtol=1e-3), "s_cls = 0.7 must move the focal term"
    torch.testing.assert_close(ours.components["cls"], cls_weight * ref["cls"], **TIGHT)
    torch.testing.assert_close(ours.components["reg"], ref["reg"], **TIGHT)
    torch.testing.assert_close(ours.components["ctr"], ref["ctr"], **TIGHT)
    torch.testing.assert_close(ours.level_losses.detach(), cls_weight * ref["cls"] + ref["reg"] + ref["ctr"], **TIGHT)


def test_bayesian_gradients_reach_log_variances() -> None:
    """d(Σ_i L_i)/ds_cls and d/ds_reg equal Σ over locations of the hand-derived d Eq. 16/ds and d Eq. 14/ds."""
    model = build(bayes_cfg(S_CLS, S_REG, log_var_range=[-5.0, 5.0]))
    s_cls, s_reg = log_vars(model)
    for s in (s_cls, s_reg):
        check_derivatives(s, 0.1)  # the hand derivatives against central differences of the formulas
    images, targets = batch()
    ours, t, outputs, points, counts = head_pass(model, images, targets)
    ours.level_losses.sum().backward()
    with torch.no_grad():
        d = reference_levels(
            t, outputs, points, counts, SMALL_BOUNDS, "smooth_l1", 0.1, "per_batch", s_cls, s_reg, d_ds=True
        )
    assert model.log_variances is not None
    grads = {name: p.grad for name, p in model.log_variances.log_vars.items()}
    assert set(grads) == {"cls", "reg"} and all(g is not None for g in grads.values())
    torch.testing.assert_close(grads["cls"], d["cls"].sum().to(grads["cls"].dtype), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grads["reg"], d["reg"].sum().to(grads["reg"].dtype), rtol=1e-8, atol=1e-12)
    assert all(torch.isfinite(p.grad).all() for p in model.head.parameters())


def test_log_variances_only_when_bayesian_and_l1_rejected() -> None:
    assert build_model(tiny_cfg(), NUM_CLASSES).log_variances is None
    with pytest.raises(ValueError, match=r"box_loss=l1.*smooth_l1"):
        build_model(tiny_cfg(bayesian=True, box_loss="l1"), NUM_CLASSES)


# --- building, eval and errors -------------------------------------------------------------------------


def test_build_honours_model_config() -> None:
    cfg = tiny_cfg()
    cfg.model.head_norm = "none"
    cfg.model.prior_probability = 0.05
    cfg.model.topk_candidates = 77
    model = build_model(cfg, NUM_CLASSES)
    assert "fcos" in DETECTORS and isinstance(model, PerLevelFCOS)
    assert not any(isinstance(m, nn.GroupNorm) for m in model.head.modules())
    bias = model.head.classification_head.cls_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(0.95 / 0.05)))
    assert model.topk_candidates == 77 and model.transform.min_size == (160,)
    gn = build_model(tiny_cfg(), NUM_CLASSES)
    norms = [m for m in gn.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8 and all(m.num_groups == 4 for m in norms)
    # P6/P7 from P5 (16 channels in), as torchvision's fcos_resnet50_fpn
    assert gn.backbone.fpn.extra_blocks.use_P5 and gn.backbone.fpn.extra_blocks.p6.in_channels == 16


def test_eval_matches_torchvision_in_input_coordinates() -> None:
    cfg = tiny_cfg()
    cfg.model.score_thresh = 0.0  # keep low-scoring boxes too, so every image has detections
    model = build(cfg).eval()
    tv = torchvision_twin(model, cfg).eval()
    images = [torch.rand(3, 64, 80, dtype=torch.float64), torch.rand(3, 200, 120, dtype=torch.float64)]
    with torch.no_grad():
        ours, theirs = model(images), tv(images)
    for o, t in zip(ours, theirs, strict=True):
        assert set(o) == {"boxes", "scores", "labels"} and len(o["boxes"]) > 0
        for k in o:
            torch.testing.assert_close(o[k], t[k])
        assert o["labels"].min() >= 0 and o["labels"].max() < NUM_CLASSES
        assert (o["scores"] >= 0).all() and (o["scores"] <= 1).all()  # sqrt(p_cls · p_ctr)


def test_bad_targets_are_clear_errors() -> None:
    model = build(tiny_cfg())
    images, targets = batch()
    targets[2]["boxes"][1] = torch.tensor([30.0, 30.0, 30.0, 41.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"target 2: box .* positive width"):
        model(images, targets)
    images, targets = batch()
    targets[1]["labels"][0] = NUM_CLASSES
    with pytest.raises(ValueError, match=f"target 1: label {NUM_CLASSES} is outside"):
        model(images, targets)
    with pytest.raises(ValueError, match="targets are required"):
        model(images)


# --- configs and CLI -----------------------------------------------------------------------------------


def test_fcos_configs_load() -> None:
    files = sorted((REPO / "configs" / "fcos").glob("fcos_*.yaml"))
    assert len(files) == 20
    for path in files:
        cfg = load_config(path)
        assert cfg.model.name == "fcos" and cfg.model.head_norm == "group_norm", path.name
        assert cfg.loss.bayesian == ("bayesian" in path.stem), path.name
        assert cfg.loss.box_loss == ("smooth_l1" if cfg.loss.bayesian else "giou"), path.name
        assert cfg.weighting.name == {"avw": "avw", "rlo": "rlo"}.get(path.stem.split("_")[-1], "equal"), path.name
    synthetic = load_config(REPO / "configs" / "fcos_synthetic.yaml")
    assert synthetic.model.name == "fcos" and synthetic.data.train.format == "synthetic"


# fcos_synthetic.yaml is Bayesian with RLO; each method sets both switches (and the box loss)
PLAIN = {"loss.bayesian": "false", "loss.box_loss": "giou"}
BAYESIAN = {"loss.bayesian": "true", "loss.box_loss": "smooth_l1"}
METHODS = {
    "baseline": {**PLAIN, "weighting.name": "equal"},
    "bayesian": {**BAYESIAN, "weighting.name": "equal"},
    "avw": {**PLAIN, "weighting.name": "avw", "weighting.interval": 2},
    "rlo": {**PLAIN, "weighting.name": "rlo", "weighting.interval": 2},
    "bayesian_rlo": {**BAYESIAN, "weighting.name": "rlo", "weighting.interval": 2},
}


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fcos_cache")


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_train_eval_predict(method: str, tmp_path: Path, synthetic_cache: Path) -> None:
    extra: dict[str, object] = {
        "model.name": "fcos",
        "model.min_size": 64,
        "model.max_size": 64,
        "model.anchor_sizes": None,  # FCOS has regression ranges (fcos_synthetic.yaml's), no anchors
        "data.synthetic.cache_dir": str(synthetic_cache),
        "data.synthetic.num_val": 3,
        "train.max_iter": 2,
        "checkpoint.period": 0,
        "log.tensorboard": "false",
        **METHODS[method],
    }
    run = tmp_path / "run"
    config = str(REPO / "configs" / "fcos_synthetic.yaml")
    assert main(["train", config, *tiny_overrides(tmp_path, extra), "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and len(r["level_losses"]) == 5 for r in records)
    assert ("loss/log_var/cls" in records[-1]) == ("bayesian" in method)
    ckpt = str(run / "checkpoints" / "last.pt")
    assert main(["eval", ckpt, "--out", str(tmp_path / "m.json")]) == 0
    assert "AP" in json.loads((tmp_path / "m.json").read_text())["bbox"]
    image = sorted(synthetic_cache.rglob("val/*.png"))[0]
    out = tmp_path / "pred"
    assert main(["predict", ckpt, str(image), "--out", str(out), "--score-thresh", "0"]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 1 and preds[0]["detections"]
