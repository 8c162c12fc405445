"""Per-level Faster R-CNN: level losses that sum to torchvision's, labels 0..C-1, Bayesian heads, configs, CLI."""

from __future__ import annotations

import json
import math
import re
from unittest import mock

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

import robustdet.losses.task as task_module
from robustdet.cli import main
from robustdet.config import Config, config_from_dict, load_config
from robustdet.models import DETECTORS, DetectorLosses, PerLevelFasterRCNN, build_model
from robustdet.models.anchors import build_anchor_generator
from robustdet.models.backbones import build_backbone
from robustdet.models.faster_rcnn import canonical_scale, sum_by_level
from tests.bayesian_reference import eq14_ds
from tests.conftest import REPO, tiny_overrides

NUM_CLASSES = 3
# P2 anchor 6 px: FPN Eq. 1 with canonical size 224 · 6/32 = 42 sends RoIs under 21 px to P2, 21-42 px to
# P3, 42-84 px to P4 and larger ones to P5, so the batch below (whose boxes are also RoIs) has all four
ANCHORS = [6.0, 12.0, 24.0, 48.0, 96.0]
BETA = 1 / 9  # torchvision's smooth-L1 beta for the RPN and the box head
SEED = 7


def tiny_cfg(head_norm: str = "none", **loss: object) -> Config:
    if loss.get("bayesian"):  # these tests check Eq. 14 / 16 as written: the paper form, not the default
        loss.setdefault("bayesian_form", "paper")
    return config_from_dict(
        {
            "model": {
                "name": "faster_rcnn",
                "backbone": "resnet18",
                "fpn_channels": 16,
                "head_norm": head_norm,
                "group_norm_groups": 4,
                "min_size": 96,
                "max_size": 128,
                "anchor_sizes": ANCHORS,
                "anchor_scales": [1.0],
            },
            "loss": {"box_loss": "smooth_l1", "beta": BETA, **loss},
        }
    )


def build(cfg: Config, seed: int = 0) -> PerLevelFasterRCNN:
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_CLASSES)
    assert isinstance(model, PerLevelFasterRCNN)
    # larger head weights than torchvision's init (RPN std 0.01), so losses and gradients are far from trivial
    with torch.no_grad():
        for p in [*model.rpn.head.parameters(), *model.roi_heads.box_predictor.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return model.double().train()


def batch(empty: bool = False) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Three images (not resized by min_size 96 / max_size 128) with 0, 1 and 5 boxes of 8 to 100 px."""
    g = torch.Generator().manual_seed(1)
    images = [
        torch.rand(3, h, w, generator=g, dtype=torch.float64) for h, w in [(96, 112), (104, 96), (96, 128)]
    ]
    boxes = [
        torch.zeros((0, 4)),
        torch.tensor([[4.0, 6.0, 60.0, 70.0]]),
        torch.tensor(
            [
                [2.0, 3.0, 10.0, 11.0],
                [22.0, 23.0, 52.0, 51.0],
                [44.0, 12.0, 84.0, 52.0],
                [10.0, 2.0, 118.0, 94.0],
                [90.0, 60.0, 98.0, 66.0],
            ]
        ),
    ]
    labels = [torch.zeros(0, dtype=torch.int64), torch.tensor([2]), torch.tensor([0, 1, 2, 0, 1])]
    if empty:
        boxes, labels = [b[:0] for b in boxes], [lab[:0] for lab in labels]
    targets = [{"boxes": b.double(), "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
    return images, targets


def shifted(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """torchvision's labels: 0 is background, classes are 1..C."""
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def torchvision_twin(model: PerLevelFasterRCNN, cfg: Config) -> FasterRCNN:
    """A plain torchvision Faster R-CNN of the same architecture, loaded with our state dict."""
    m = cfg.model
    tv = FasterRCNN(
        build_backbone(m, "p2p6"),
        NUM_CLASSES + 1,
        min_size=m.min_size,
        max_size=m.max_size,
        rpn_anchor_generator=build_anchor_generator(m.anchor_sizes, m.anchor_scales, m.aspect_ratios),
        box_roi_pool=MultiScaleRoIAlign(
            ["0", "1", "2", "3"], 7, 2, canonical_scale=canonical_scale(m.anchor_sizes)
        ),
        box_score_thresh=m.score_thresh,
        box_nms_thresh=m.nms_thresh,
        box_detections_per_img=m.detections_per_img,
    )
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("log_variances.")}
    tv.load_state_dict(state)
    return tv.double().train(model.training)


def both(model: PerLevelFasterRCNN, tv: FasterRCNN, empty: bool = False) -> tuple[DetectorLosses, dict[str, Tensor]]:
    """One training forward of each on the same batch, the samplers' random draws fixed alike."""
    images, targets = batch(empty)
    torch.manual_seed(SEED)
    ours = model(images, targets)
    torch.manual_seed(SEED)
    # torchvision's RPN labels are float32 whatever the model's dtype, and binary_cross_entropy_with_logits
    # of a float64 input and a float32 target returns float32: cast the (0/1) target so that its
    # objectness loss is computed in float64 too and the comparison can be tight
    bce = F.binary_cross_entropy_with_logits
    with mock.patch.object(F, "binary_cross_entropy_with_logits", lambda x, t, **kw: bce(x, t.to(x.dtype), **kw)):
        theirs = tv(images, shifted(targets))
    assert isinstance(ours, DetectorLosses)
    assert all(v.dtype == torch.float64 for v in theirs.values())
    return ours, theirs


TIGHT = {"rtol": 1e-9, "atol": 1e-12}


# --- equivalence with torchvision --------------------------------------------------------------------


@pytest.mark.parametrize("empty", [False, True])
def test_level_losses_sum_to_torchvision(empty: bool) -> None:
    cfg = tiny_cfg()
    model = build(cfg)
    ours, theirs = both(model, torchvision_twin(model, cfg), empty)
    assert ours.level_names == model.level_names == ["P2", "P3", "P4", "P5"]
    assert ours.level_losses.shape == (4,) and ours.level_losses.requires_grad
    assert set(ours.components) == {"roi_cls", "roi_reg"}
    assert set(ours.extra_components) == {"rpn_cls", "rpn_reg"}
    assert all(v.shape == (5,) and not v.requires_grad for v in ours.extra_components.values())
    assert ours.extra_loss.requires_grad
    torch.testing.assert_close(ours.level_losses, ours.components["roi_cls"] + ours.components["roi_reg"])
    # the RoI head's losses, split by the level each RoI was pooled from
    torch.testing.assert_close(ours.components["roi_cls"].sum(), theirs["loss_classifier"], **TIGHT)
    torch.testing.assert_close(ours.components["roi_reg"].sum(), theirs["loss_box_reg"], **TIGHT)
    torch.testing.assert_close(ours.level_losses.sum(), theirs["loss_classifier"] + theirs["loss_box_reg"], **TIGHT)
    # the RPN's, split by anchor level, outside the weighting
    torch.testing.assert_close(ours.extra_components["rpn_cls"].sum(), theirs["loss_objectness"], **TIGHT)
    torch.testing.assert_close(ours.extra_components["rpn_reg"].sum(), theirs["loss_rpn_box_reg"], **TIGHT)
    torch.testing.assert_close(ours.extra_loss, theirs["loss_objectness"] + theirs["loss_rpn_box_reg"], **TIGHT)
    torch.testing.assert_close(ours.total, sum(theirs.values()), **TIGHT)
    if not empty:
        # the batch reaches every RoI level and several anchor levels, so the split is exercised
        assert (ours.components["roi_cls"] > 0).all() and (ours.components["roi_reg"] > 0).sum() >= 3
        assert (ours.extra_components["rpn_reg"] > 0).sum() >= 3
    else:
        assert float(ours.components["roi_reg"].sum()) == 0.0 and float(ours.extra_components["rpn_reg"].sum()) == 0


def test_gradients_match_torchvision() -> None:
    cfg = tiny_cfg()
    model = build(cfg)
    tv = torchvision_twin(model, cfg)
    ours, theirs = both(model, tv)
    ours.total.backward()
    sum(theirs.values()).backward()
    ours_grads = dict(model.named_parameters())
    checked = 0
    for name, p in tv.named_parameters():
        if p.grad is None:
            assert ours_grads[name].grad is None, name
            continue
        torch.testing.assert_close(ours_grads[name].grad, p.grad, rtol=1e-7, atol=1e-10, msg=name)
        checked += 1
    assert checked > 50


# --- each level against a reference ------------------------------------------------------------------


def test_rpn_levels_against_a_per_anchor_reference() -> None:
    model = build(tiny_cfg(cls_weight=0.7))
    model.rpn.fg_bg_sampler.batch_size_per_image = 8  # fewer than the candidates: the draw matters
    g = torch.Generator().manual_seed(2)
    counts = [12, 6, 3]
    num_images, per_image = 2, sum(counts)
    objectness = torch.randn(num_images * per_image, 1, generator=g, dtype=torch.float64) * 2
    deltas = torch.randn(num_images * per_image, 4, generator=g, dtype=torch.float64)
    labels = [torch.randint(-1, 2, (per_image,), generator=g).double() for _ in range(num_images)]
    targets = [torch.randn(per_image, 4, generator=g, dtype=torch.float64) for _ in range(num_images)]
    torch.manual_seed(3)
    cls, reg = model.rpn_level_losses(objectness, deltas, labels, targets, counts)
    torch.manual_seed(3)
    pos_masks, neg_masks = model.rpn.fg_bg_sampler(labels)
    level_of = [lvl for lvl, n in enumerate(counts) for _ in range(n)]
    ref_cls, ref_reg, sampled = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for b in range(num_images):
        for a in range(per_image):
            if not (pos_masks[b][a] or neg_masks[b][a]):
                continue
            sampled += 1
            k = b * per_image + a
            ref_cls[level_of[a]] += F.binary_cross_entropy_with_logits(objectness[k, 0], labels[b][a])
            if pos_masks[b][a]:
                ref_reg[level_of[a]] += F.smooth_l1_loss(deltas[k], targets[b][a], beta=BETA, reduction="sum")
    assert sampled == 16 and ref_reg.gt(0).any()
    torch.testing.assert_close(cls, 0.7 * ref_cls / sampled, **TIGHT)
    torch.testing.assert_close(reg, ref_reg / sampled, **TIGHT)


def test_roi_levels_against_a_per_roi_reference() -> None:
    model = build(tiny_cfg(cls_weight=0.7))
    g = torch.Generator().manual_seed(4)
    sizes = [7, 5]
    num_rois, c1 = sum(sizes), NUM_CLASSES + 1
    logits = torch.randn(num_rois, c1, generator=g, dtype=torch.float64) * 2
    box_regression = torch.randn(num_rois, 4 * c1, generator=g, dtype=torch.float64)
    labels = [torch.randint(0, c1, (n,), generator=g) for n in sizes]
    targets = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in sizes]
    levels = torch.randint(0, 4, (num_rois,), generator=g)
    cls, reg, _ = model.roi_level_losses(logits, box_regression, labels, targets, levels)
    flat_labels, flat_targets = torch.cat(labels), torch.cat(targets)
    ref_cls, ref_reg = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for r in range(num_rois):
        c, k = int(flat_labels[r]), int(levels[r])
        ref_cls[k] += F.cross_entropy(logits[r : r + 1], flat_labels[r : r + 1])
        if c > 0:
            pred = box_regression[r, 4 * c : 4 * c + 4]
            ref_reg[k] += F.smooth_l1_loss(pred, flat_targets[r], beta=BETA, reduction="sum")
    torch.testing.assert_close(cls, 0.7 * ref_cls / num_rois, **TIGHT)
    torch.testing.assert_close(reg, ref_reg / num_rois, **TIGHT)


def test_roi_levels_are_the_poolers_fpn_mapping() -> None:
    model = build(tiny_cfg())
    # set from the pyramid's strides when the model is built, not by the pooler's first call
    assert model.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    images, targets = batch()
    before = model.roi_levels([torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
    model(images, targets)
    assert torch.equal(model.roi_levels([torch.tensor([[0.0, 0.0, 10.0, 10.0]])]), before)
    assert model.roi_heads.box_roi_pool.map_levels is not None
    side = torch.tensor([4.0, 20.0, 21.0, 41.0, 43.0, 83.0, 85.0, 300.0], dtype=torch.float64)
    boxes = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], dim=1)
    # FPN Eq. 1: k = floor(4 + log2(√(wh) / 42)), clamped to P2..P5
    expected = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.equal(model.roi_levels([boxes[:3], boxes[3:]]), expected)


def test_sum_by_level_is_a_plain_grouped_sum() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], requires_grad=True)
    out = sum_by_level(values, torch.tensor([2, 0, 2, 3, 0]), 5)
    assert out.tolist() == [18.0, 0.0, 5.0, 8.0, 0.0]
    (out * torch.arange(5.0)).sum().backward()
    assert values.grad is not None and values.grad.tolist() == [2.0, 0.0, 2.0, 3.0, 0.0]


# --- labels and eval ---------------------------------------------------------------------------------


def test_eval_returns_labels_from_zero_and_torchvisions_boxes() -> None:
    cfg = tiny_cfg()
    cfg.model.score_thresh = 0.0  # keep low-scoring boxes too, so every image has detections
    cfg.model.detections_per_img = 1000  # and every class has some
    model = build(cfg).eval()
    tv = torchvision_twin(model, cfg).eval()
    images = [torch.rand(3, 64, 80, dtype=torch.float64), torch.rand(3, 150, 90, dtype=torch.float64)]
    with torch.no_grad():
        ours, theirs = model(images), tv(images)
    for o, t in zip(ours, theirs, strict=True):
        assert set(o) == {"boxes", "scores", "labels"} and len(o["boxes"]) > 0
        torch.testing.assert_close(o["boxes"], t["boxes"])
        torch.testing.assert_close(o["scores"], t["scores"])
        assert torch.equal(o["labels"], t["labels"] - 1)
        assert int(o["labels"].min()) >= 0 and int(o["labels"].max()) <= NUM_CLASSES - 1
    assert {int(x) for o in ours for x in o["labels"]} == set(range(NUM_CLASSES))
    assert float(ours[1]["boxes"][:, 3].max()) > 128  # rescaled to the 150 px input frame


def test_training_labels_are_zero_based() -> None:
    model = build(tiny_cfg())
    images, targets = batch()
    targets[2]["labels"][0] = NUM_CLASSES - 1  # the last class is fine: torchvision's class C
    model(images, targets)
    assert targets[2]["labels"][0] == NUM_CLASSES - 1, "the caller's targets must not be shifted in place"
    targets[1]["labels"][0] = NUM_CLASSES
    with pytest.raises(ValueError, match=f"target 1: label {NUM_CLASSES} is outside 0..{NUM_CLASSES - 1}"):
        model(images, targets)
    images, targets = batch()
    targets[2]["boxes"][1] = torch.tensor([30.0, 30.0, 30.0, 41.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"target 2: box .* positive width"):
        model(images, targets)
    with pytest.raises(ValueError, match="targets are required"):
        model(images)


# --- Bayesian ----------------------------------------------------------------------------------------


def bayes_cfg(s_rpn_cls: float = 0.0, s_roi_cls: float = 0.0, **loss: object) -> Config:
    init = {"rpn_cls": s_rpn_cls, "rpn_reg": 1.0, "roi_cls": s_roi_cls, "roi_reg": -0.5}
    return tiny_cfg(bayesian=True, log_var_init=init, **loss)


@pytest.mark.parametrize(("s_rpn", "s_roi"), [(0.0, 0.0), (0.3, -0.4)])
def test_bayesian_classification_is_kendalls_scaling_of_the_plain_one(s_rpn: float, s_roi: float) -> None:
    """e^(−s)·CE + s/2 per sampled anchor / RoI, over the sampled count: e^(−s)·plain + s/2 in total."""
    bayes = build(bayes_cfg(s_rpn, s_roi))
    plain = build(tiny_cfg(), seed=1)
    missing, unexpected = plain.load_state_dict(bayes.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("log_variances.") for k in unexpected)
    images, targets = batch()
    torch.manual_seed(SEED)
    b = bayes(images, targets)
    torch.manual_seed(SEED)
    p = plain(images, targets)
    assert bayes.log_variances is not None
    for key, out_b, out_p in [
        ("rpn_cls", b.extra_components, p.extra_components),
        ("roi_cls", b.components, p.components),
    ]:
        s = float(bayes.log_variances[key].detach())  # the float32 parameter's value: 0.3 is not a float32
        torch.testing.assert_close(out_b[key].sum(), math.exp(-s) * out_p[key].sum() + s / 2, **TIGHT)
        if s == 0.0:  # level by level too: the plain loss exactly
            torch.testing.assert_close(out_b[key], out_p[key], **TIGHT)
    # s_reg ≠ 0 and the Gaussian/Laplace form (Eq. 14) change the regression terms
    assert not torch.allclose(b.components["roi_reg"], p.components["roi_reg"])


def _eq14(err: np.ndarray, s: float, c: float) -> np.ndarray:
    """Eq. 14 of Khanzhina et al. elementwise, written out independently with scipy's erfc."""
    sigma2 = math.exp(s)
    log_tau = math.log(scipy.special.erfc(c / math.sqrt(2 * sigma2)))
    gauss = err**2 / (2 * sigma2) + s / 2
    laplace = -(err / c) * log_tau + log_tau + c**2 / (2 * sigma2) + s / 2
    return np.where(err < c, gauss, laplace)


def record_bayesian_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[Tensor, ...]]]:
    """The (input, target, log_var) each Bayesian loss of the model is called with, detached."""
    calls: dict[str, list[tuple[Tensor, ...]]] = {"bce": [], "ce": [], "sl1": []}

    def recorder(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name].append(tuple(a.detach() if isinstance(a, Tensor) else a for a in args[:3]))
            return fn(*args, **kwargs)

        return wrapped

    # the detectors reach the Bayesian losses through losses.task_loss (the BCE as Eq. 16 with γ = 0)
    for name, attr in [("bce", "bayesian_focal_loss"), ("ce", "bayesian_cross_entropy"),
                       ("sl1", "bayesian_smooth_l1_loss")]:
        monkeypatch.setattr(task_module, attr, recorder(name, getattr(task_module, attr)))
    return calls


def test_bayesian_regression_is_eq14_over_torchvisions_normaliser(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_bayesian_calls(monkeypatch)
    model = build(bayes_cfg(0.2, 0.1))
    images, targets = batch()
    out = model(images, targets)
    assert len(calls["bce"]) == len(calls["ce"]) == 1 and len(calls["sl1"]) == 2  # RPN first, then RoI
    num_anchors = calls["bce"][0][0].numel()  # the sampled anchors: torchvision's normaliser
    num_rois = calls["ce"][0][0].shape[0]  # the sampled RoIs
    for (pred, target, s), total, n in [
        (calls["sl1"][0], out.extra_components["rpn_reg"].sum(), num_anchors),
        (calls["sl1"][1], out.components["roi_reg"].sum(), num_rois),
    ]:
        assert pred.shape[0] > 0
        expected = _eq14((pred - target).abs().numpy(), float(s), BETA).sum() / n
        torch.testing.assert_close(total, torch.tensor(expected, dtype=torch.float64), **TIGHT)
    assert [float(c[2]) for c in calls["sl1"]] == [1.0, -0.5]  # s_rpn_reg, s_roi_reg


def test_bayesian_gradients_reach_all_four_log_variances(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each s's gradient against the formula on the sampled anchors / RoIs the losses saw: d/ds of
    e^(−s)·CE + s/2 is −e^(−s)·CE + 1/2 (plain BCE / CE from torch), of Eq. 14 the hand derivative
    (``bayesian_reference.eq14_ds``), each over torchvision's normaliser (the sampled count)."""
    calls = record_bayesian_calls(monkeypatch)
    model = build(bayes_cfg(0.2, -0.1, log_var_range=[-5.0, 5.0]))
    images, targets = batch()
    out = model(images, targets)
    assert isinstance(out, DetectorLosses)
    out.total.backward()
    assert model.log_variances is not None
    assert set(model.log_variances.names) == {"rpn_cls", "rpn_reg", "roi_cls", "roi_reg"}
    (x_rpn, t_rpn, s_rpn), (z_roi, c_roi, s_roi) = calls["bce"][0], calls["ce"][0]
    num_anchors, num_rois = x_rpn.numel(), z_roi.shape[0]
    bce = F.binary_cross_entropy_with_logits(x_rpn, t_rpn.to(x_rpn.dtype), reduction="sum")
    ce = F.cross_entropy(z_roi, c_roi, reduction="sum")
    expected = {
        "rpn_cls": (-math.exp(-float(s_rpn)) * bce + 0.5 * num_anchors) / num_anchors,
        "roi_cls": (-math.exp(-float(s_roi)) * ce + 0.5 * num_rois) / num_rois,
    }
    for key, (pred, target, s), n in [
        ("rpn_reg", calls["sl1"][0], num_anchors),
        ("roi_reg", calls["sl1"][1], num_rois),
    ]:
        assert pred.shape[0] > 0
        expected[key] = eq14_ds(pred - target, float(s), BETA).sum() / n
    for name, p in model.log_variances.log_vars.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name].to(p.grad.dtype), rtol=1e-8, atol=1e-12, msg=name)


def test_log_variances_only_when_bayesian() -> None:
    assert build_model(tiny_cfg(), NUM_CLASSES).log_variances is None
    lv = build_model(tiny_cfg(bayesian=True), NUM_CLASSES).log_variances
    assert lv is not None and lv.as_dict() == PerLevelFasterRCNN.loss_tasks


# --- building and errors -----------------------------------------------------------------------------


def test_registered_and_built_from_the_config() -> None:
    assert DETECTORS["faster_rcnn"] is PerLevelFasterRCNN
    plain = build_model(tiny_cfg(), NUM_CLASSES)
    assert isinstance(plain.roi_heads.box_head, TwoMLPHead)
    assert plain.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1  # + background
    assert plain.rpn_level_names == ["P2", "P3", "P4", "P5", "P6"]
    assert plain.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    gn = build_model(tiny_cfg(head_norm="group_norm"), NUM_CLASSES)
    assert isinstance(gn.roi_heads.box_head, FastRCNNConvFCHead)
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.roi_heads.box_head.modules()) == 4
    # torchvision's canonical 224 for its own anchors (32 px on P2), scaled with smaller ones
    assert canonical_scale([32, 64, 128, 256, 512]) == 224 and canonical_scale(ANCHORS) == 42
    assert plain.roi_heads.box_roi_pool.canonical_scale == 42


def test_unavailable_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"loss\.box_loss=giou is not available for Faster R-CNN"):
        build_model(tiny_cfg(box_loss="giou"), NUM_CLASSES)
    with pytest.raises(ValueError, match=r"box_loss=l1.*smooth_l1"):
        build_model(tiny_cfg(bayesian=True, box_loss="l1"), NUM_CLASSES)
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match=r"model\.anchor_sizes needs one anchor size per level \(5\)"):
        cfg.model.anchor_sizes = [32.0, 64.0, 128.0, 256.0]
    with pytest.raises(ValueError, match=r"needs exactly the keys \['roi_cls', 'roi_reg', 'rpn_cls', 'rpn_reg'\]"):
        build_model(tiny_cfg(bayesian=True, log_var_init={"cls": 0.0, "reg": 1.0}), NUM_CLASSES)


# --- configs and the CLI -----------------------------------------------------------------------------

FASTER_RCNN_CONFIGS = sorted((REPO / "configs" / "faster_rcnn").glob("faster_rcnn_*.yaml"))
METHODS = {
    "baseline": (False, "equal"),
    "bayesian": (True, "equal"),
    "avw": (False, "avw"),
    "rlo": (False, "rlo"),
    "bayesian_rlo": (True, "rlo"),
}


def test_every_faster_rcnn_config_loads_with_its_method() -> None:
    assert len(FASTER_RCNN_CONFIGS) == 20  # R50 / R101 x COCO 1x / VOC x 5 methods
    for path in FASTER_RCNN_CONFIGS:
        cfg = load_config(path)
        match = re.fullmatch(r"faster_rcnn_(r50|r101)_fpn_(coco_1x|voc)_(\w+)\.yaml", path.name)
        assert match is not None, path.name
        depth, dataset, method = match.groups()
        assert cfg.model.name == "faster_rcnn" and cfg.model.backbone == f"resnet{depth[1:]}", path.name
        assert (cfg.loss.bayesian, cfg.weighting.name) == METHODS[method], path.name
        assert len(cfg.model.anchor_sizes) == 5 and cfg.model.anchor_scales == [1.0], path.name
        assert cfg.loss.beta == pytest.approx(BETA) and cfg.train.optimizer.lr == 0.01, path.name
        assert cfg.data.train.format == ("coco" if dataset == "coco_1x" else "voc"), path.name
    synthetic = load_config(REPO / "configs" / "faster_rcnn_synthetic.yaml")
    assert synthetic.model.name == "faster_rcnn" and synthetic.model.backbone_weights is None
    assert synthetic.model.anchor_sizes == [8, 16, 32, 64, 128] and synthetic.loss.bayesian


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One synthetic data set for the five runs: generating it is a good part of a run's time."""
    return tmp_path_factory.mktemp("faster_rcnn_cache")


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_train_eval_predict(method: str, tmp_path, synthetic_cache) -> None:  # type: ignore[no-untyped-def]
    bayesian, weighting = METHODS[method]
    extra = {
        "data.synthetic.cache_dir": str(synthetic_cache),
        "loss.bayesian": bayesian,
        "weighting.name": weighting,
        "weighting.interval": 2 if weighting != "equal" else None,
        # AVW and RLO close their first window (interval 2) after iteration 2; one is enough otherwise
        "train.max_iter": 2 if weighting != "equal" else 1,
        "checkpoint.period": 0,
    }
    run = tmp_path / "run"
    config = str(REPO / "configs" / "faster_rcnn_synthetic.yaml")
    assert main(["train", config, *tiny_overrides(tmp_path, extra), "--out", str(run)]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["level_names"] == ["P2", "P3", "P4", "P5"] and len(last["level_weights"]) == 4
    assert len(last["level_roi_cls"]) == len(last["level_roi_reg"]) == 4
    assert len(last["rpn_cls"]) == len(last["rpn_reg"]) == 5
    log_vars = {f"loss/log_var/{k}" for k in PerLevelFasterRCNN.loss_tasks}
    assert log_vars <= set(last) if bayesian else not any(k.startswith("loss/log_var/") for k in last)
    if weighting == "rlo":
        assert last["weighting/action"] in (0, 1, 2, 3)
    ckpt = str(run / "checkpoints" / "last.pt")
    assert main(["eval", ckpt, "--out", str(tmp_path / "m.json")]) == 0
    assert "AP50" in json.loads((tmp_path / "m.json").read_text())["bbox"]
    image = sorted(synthetic_cache.rglob("val/*.png"))[0]
    pred = tmp_path / "pred"
    assert main(["predict", ckpt, str(image), "--out", str(pred), "--score-thresh", "0"]) == 0
    detections = json.loads((pred / "predictions.json").read_text())[0]["detections"]
    assert detections and all(d["label"] for d in detections)
    if method == "bayesian_rlo":
        # the report plots the unweighted RPN levels too, on a symlog axis when Bayesian losses go negative
        assert main(["report", str(run)]) == 0
        assert (run / "report" / "rpn_losses.png").stat().st_size > 0
