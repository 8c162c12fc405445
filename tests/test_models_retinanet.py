"""Per-level RetinaNet: batched matching, per-level losses equal to torchvision's, Bayesian terms, eval."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import box_iou, generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as tv_focal

from robustdet.config import Config, config_from_dict
from robustdet.models import DetectorLosses, FCOSConfig, PerLevelRetinaNet, build_model
from robustdet.models.anchors import build_anchor_generator
from robustdet.models.backbones import build_backbone
from robustdet.models.matching import batched_box_iou, match_anchors
from tests.bayesian_reference import check_derivatives, eq14, eq14_ds, eq16, eq16_ds

NUM_CLASSES = 3


def tiny_cfg(**loss: object) -> Config:
    if loss.get("bayesian"):  # these tests check Eq. 14 / 16 as written: the paper form, not the default
        loss.setdefault("bayesian_form", "paper")
    return config_from_dict(
        {
            "model": {
                "backbone": "resnet18",
                "fpn_channels": 16,
                "head_norm": "group_norm",
                "group_norm_groups": 4,
                "min_size": 96,
                "max_size": 128,
                "anchor_sizes": [8, 16, 32, 64, 128],
            },
            "loss": {"normalization": "per_image", "box_loss": "l1", **loss},
        }
    )


def build(cfg: Config, seed: int = 0) -> PerLevelRetinaNet:
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_CLASSES)
    assert isinstance(model, PerLevelRetinaNet)
    # larger head weights than the 0.01 init, so losses and gradients are far from trivial
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double().train()


def batch(empty: bool = False) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Three images of different sizes with 0, 1 and 5 boxes, sized and placed for P3, P4, P5 and P6."""
    g = torch.Generator().manual_seed(1)
    images = [
        torch.rand(3, h, w, generator=g, dtype=torch.float64) for h, w in [(96, 112), (104, 96), (96, 96)]
    ]
    boxes = [
        torch.zeros((0, 4)),
        torch.tensor([[4.0, 6.0, 60.0, 70.0]]),
        torch.tensor(
            [
                [2.0, 3.0, 9.0, 10.0],
                [22.0, 23.0, 42.0, 41.0],
                [44.0, 12.0, 84.0, 52.0],
                [32.0, 31.0, 96.0, 94.0],
                [50.0, 60.0, 58.0, 66.0],
            ]
        ),
    ]
    labels = [torch.zeros(0, dtype=torch.int64), torch.tensor([2]), torch.tensor([0, 1, 2, 0, 1])]
    if empty:
        boxes, labels = [b[:0] for b in boxes], [lab[:0] for lab in labels]
    targets = [{"boxes": b.double(), "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
    return images, targets


def torchvision_twin(model: PerLevelRetinaNet, cfg: Config, loss_type: str) -> RetinaNet:
    """A plain torchvision RetinaNet of the same architecture, loaded with our state dict."""
    m = cfg.model
    anchors = build_anchor_generator(m.anchor_sizes, m.anchor_scales, m.aspect_ratios)
    head = RetinaNetHead(
        m.fpn_channels,
        anchors.num_anchors_per_location()[0],
        NUM_CLASSES,
        norm_layer=lambda c: torch.nn.GroupNorm(m.group_norm_groups, c),
    )
    tv = RetinaNet(
        build_backbone(m, "p3p7"),
        NUM_CLASSES,
        min_size=m.min_size,
        max_size=m.max_size,
        anchor_generator=anchors,
        head=head,
        score_thresh=m.score_thresh,
        detections_per_img=m.detections_per_img,
    )
    tv.load_state_dict(model.state_dict())
    tv.head.regression_head._loss_type = loss_type
    return tv.double().train(model.training)


STRIDES = (8, 16, 32, 64, 128)  # P3-P7


def independent_anchors(cfg: Config, padded: tuple[int, int], dtype: torch.dtype):
    """Anchors [A, 4], anchors per level and feature-map sizes of a padded batch, without the model.

    Level i (P3 first) has a ceil(H/s_i) x ceil(W/s_i) map (P6 and P7 are stride-2 convolutions with
    padding 1), len(scales) * len(ratios) anchors per location, from a fresh torchvision AnchorGenerator.
    """
    m = cfg.model
    h, w = padded
    grid = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    per_location = len(m.anchor_scales) * len(m.aspect_ratios)
    counts = [gh * gw * per_location for gh, gw in grid]
    generator = AnchorGenerator(
        tuple(tuple(size * k for k in m.anchor_scales) for size in m.anchor_sizes),
        (tuple(m.aspect_ratios),) * len(STRIDES),
    )
    maps = [torch.zeros(1, 1, gh, gw, dtype=dtype) for gh, gw in grid]
    anchors = generator(ImageList(torch.zeros(1, 3, h, w, dtype=dtype), [(h, w)]), maps)[0]
    assert anchors.shape[0] == sum(counts)
    return anchors, counts, grid


def head_pass(model: PerLevelRetinaNet, cfg: Config, images: list[Tensor], targets: list[dict[str, Tensor]]):
    """The training forward, with what went into the loss captured through hooks on the public
    ``transform`` and ``head``, and anchors / level counts derived independently of the model."""
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
    anchors, counts, grid = independent_anchors(
        cfg, tuple(seen["image_list"].tensors.shape[-2:]), outputs["cls_logits"].dtype
    )
    assert [tuple(f.shape[-2:]) for f in seen["features"]] == grid, "feature maps are not P3-P7 in order"
    return losses, seen["targets"], outputs, anchors, counts


def reference_levels(
    targets: list[dict[str, Tensor]],
    outputs: dict[str, Tensor],
    anchors: Tensor,
    counts: list[int],
    box_loss: str,
    beta: float,
    normalization: str,
    s_cls: float | None = None,
    s_reg: float | None = None,
    d_ds: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-level cls and reg losses image by image with torchvision's Matcher and torchvision.ops losses.

    With ``s_cls`` / ``s_reg`` the focal and smooth L1 terms are Eq. 16 / Eq. 14 (``bayesian_reference``);
    with ``d_ds`` too, their derivatives in s instead, normalised alike (the normalisation is linear).
    """
    bayesian = s_cls is not None and s_reg is not None
    assert bayesian or not d_ds
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    level = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    cls_sums, reg_sums, nfg = [], [], []
    for t, logits, deltas in zip(targets, outputs["cls_logits"], outputs["bbox_regression"], strict=True):
        if t["boxes"].numel() == 0:
            matched = torch.full((anchors.shape[0],), -1, dtype=torch.int64)
        else:
            matched = matcher(box_iou(t["boxes"], anchors))
        fg, valid = matched >= 0, matched != -2
        target = torch.zeros_like(logits)
        target[fg, t["labels"][matched[fg]]] = 1.0
        if bayesian:
            per_anchor_cls = (eq16_ds if d_ds else eq16)(logits, target, s_cls).sum(1) * valid
        else:
            per_anchor_cls = tv_focal(logits, target, reduction="none").sum(1) * valid
        per_anchor_reg = torch.zeros(anchors.shape[0], dtype=logits.dtype)
        gt = t["boxes"][matched[fg]]
        if box_loss == "giou":
            per_anchor_reg[fg] = generalized_box_iou_loss(
                coder.decode_single(deltas[fg], anchors[fg]), gt, eps=1e-7
            )
        else:
            enc = coder.encode_single(gt, anchors[fg])
            if bayesian:
                assert box_loss == "smooth_l1"
                diff = (eq14_ds if d_ds else eq14)(deltas[fg] - enc, s_reg, beta)
            elif box_loss == "l1":
                diff = F.l1_loss(deltas[fg], enc, reduction="none")
            else:
                diff = F.smooth_l1_loss(deltas[fg], enc, reduction="none", beta=beta)
            per_anchor_reg[fg] = diff.sum(1)
        cls_sums.append(torch.zeros(len(counts), dtype=logits.dtype).index_add(0, level, per_anchor_cls))
        reg_sums.append(torch.zeros(len(counts), dtype=logits.dtype).index_add(0, level, per_anchor_reg))
        nfg.append(int(fg.sum()))
    cls, reg = torch.stack(cls_sums), torch.stack(reg_sums)
    if normalization == "per_image":
        n = torch.tensor(nfg, dtype=cls.dtype).clamp(min=1)[:, None]
        return (cls / n).mean(0), (reg / n).mean(0)
    n = max(1, sum(nfg))
    return cls.sum(0) / n, reg.sum(0) / n


# --- matching ---------------------------------------------------------------------------------------


def test_batched_iou_is_bitwise_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(200, 2, generator=g) * 50
    anchors = torch.cat([anchors, anchors + 1 + torch.rand(200, 2, generator=g) * 30], 1)
    boxes = [anchors[:3] + 0.5, anchors[10:11], anchors[:0]]
    padded = torch.zeros(3, 3, 4)
    valid = torch.zeros(3, 3, dtype=torch.bool)
    for i, b in enumerate(boxes):
        padded[i, : len(b)] = b
        valid[i, : len(b)] = True
    iou = batched_box_iou(anchors, padded, valid)
    for i, b in enumerate(boxes):
        assert torch.equal(iou[i, :, : len(b)], box_iou(b, anchors).T)
        assert (iou[i, :, len(b) :] == -1).all()


@pytest.mark.parametrize("quantised", [True, False])
def test_matcher_reproduces_torchvision(quantised: bool) -> None:
    g = torch.Generator().manual_seed(3)
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for trial in range(20):
        sizes = [0, 1, 3, 7][trial % 4 :] + [0, 1, 3, 7][: trial % 4]
        num_anchors = 60
        iou = torch.full((len(sizes), num_anchors, max(sizes)), -1.0)
        valid = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
        per_image = []
        for i, n in enumerate(sizes):
            if quantised:  # many exact ties, values exactly at both thresholds, columns of zeros
                m = torch.randint(0, 11, (n, num_anchors), generator=g).float() / 10
                m = m * (torch.rand(n, num_anchors, generator=g) < 0.5)
            else:
                m = torch.rand(n, num_anchors, generator=g) ** 3
            if n and trial % 3 == 0:
                m[0] = 0.0  # a box overlapping no anchor: every anchor ties at 0 and is restored
            iou[i, :, :n] = m.T
            valid[i, :n] = True
            per_image.append(m)
        ours = match_anchors(iou, valid, 0.5, 0.4)
        for i, m in enumerate(per_image):
            expected = matcher(m) if m.shape[0] else torch.full((num_anchors,), -1, dtype=torch.int64)
            assert torch.equal(ours[i], expected), (trial, i)


def test_matcher_without_any_box() -> None:
    out = match_anchors(torch.zeros(2, 5, 0), torch.zeros(2, 0, dtype=torch.bool), 0.5, 0.4)
    assert out.shape == (2, 5) and (out == -1).all()


# --- equivalence with torchvision --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box_loss", "beta", "empty"),
    [("l1", 0.1, False), ("smooth_l1", 1.0, False), ("giou", 0.1, False), ("l1", 0.1, True)],
)
def test_level_losses_sum_to_torchvision(box_loss: str, beta: float, empty: bool) -> None:
    cfg = tiny_cfg(box_loss=box_loss, beta=beta)
    model = build(cfg)
    tv = torchvision_twin(model, cfg, box_loss)
    images, targets = batch(empty)
    ours = model(images, targets)
    theirs = tv(images, targets)
    assert isinstance(ours, DetectorLosses)
    assert ours.level_names == ["P3", "P4", "P5", "P6", "P7"]
    assert ours.level_losses.shape == (5,) and ours.level_losses.requires_grad
    torch.testing.assert_close(ours.level_losses, ours.components["cls"] + ours.components["reg"])
    tight = {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(ours.components["cls"].sum(), theirs["classification"], **tight)
    torch.testing.assert_close(ours.components["reg"].sum(), theirs["bbox_regression"], **tight)
    torch.testing.assert_close(
        ours.level_losses.sum(), theirs["classification"] + theirs["bbox_regression"], **tight
    )
    assert float(ours.extra_loss) == 0.0 and ours.extra_components == {}
    if not empty:
        assert int((ours.components["reg"] > 0).sum()) >= 4, (
            "the batch should put foreground on several levels"
        )


@pytest.mark.parametrize(
    ("normalization", "box_loss"), [("per_image", "smooth_l1"), ("per_batch", "l1"), ("per_batch", "giou")]
)
def test_each_level_against_a_per_image_reference(normalization: str, box_loss: str) -> None:
    """Level by level, the model's forward and its compute_level_losses against a reference whose anchors
    and level counts come from the feature-map sizes, not from the model: a wrong level order fails."""
    cfg = tiny_cfg(normalization=normalization, box_loss=box_loss, beta=0.1, cls_weight=0.7)
    model = build(cfg)
    images, targets = batch()
    forward, t, outputs, anchors, counts = head_pass(model, cfg, images, targets)
    cls, reg = reference_levels(t, outputs, anchors, counts, box_loss, 0.1, normalization)
    assert int((reg > 0).sum()) >= 4, "the batch should put foreground on several levels"
    for ours in (forward, model.compute_level_losses(t, outputs, anchors, counts)):
        torch.testing.assert_close(ours.components["cls"], 0.7 * cls, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.components["reg"], reg, rtol=1e-9, atol=1e-12)


def test_gradients_match_torchvision() -> None:
    cfg = tiny_cfg()
    model = build(cfg)
    tv = torchvision_twin(model, cfg, "l1")
    images, targets = batch()
    model(images, targets).level_losses.sum().backward()
    theirs = tv(images, targets)
    (theirs["classification"] + theirs["bbox_regression"]).backward()
    ours_grads = dict(model.named_parameters())
    for name, p in tv.named_parameters():
        torch.testing.assert_close(ours_grads[name].grad, p.grad, rtol=1e-7, atol=1e-10, msg=name)


# --- Bayesian ----------------------------------------------------------------------------------------


S_CLS, S_REG = 0.7, -0.4  # away from s = 0, where Eq. 16 is the plain focal loss


def bayes_cfg(s_cls: float, s_reg: float, **loss: object) -> Config:
    return tiny_cfg(bayesian=True, box_loss="smooth_l1", beta=0.1, log_var_init={"cls": s_cls, "reg": s_reg}, **loss)


def log_vars(model: PerLevelRetinaNet) -> tuple[float, float]:
    """s_cls, s_reg as the model holds them (0.7 is not a float32: the reference takes the stored value)."""
    assert model.log_variances is not None
    return float(model.log_variances["cls"].detach()), float(model.log_variances["reg"].detach())


def test_bayesian_cls_with_s_zero_is_the_focal_baseline() -> None:
    cfg = bayes_cfg(0.0, 1.0)
    model = build(cfg)
    assert model.log_variances is not None and model.log_variances.as_dict() == {"cls": 0.0, "reg": 1.0}
    baseline = build(tiny_cfg(box_loss="smooth_l1"), seed=1)
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("log_variances.") for k in unexpected)
    images, targets = batch()
    b, t, outputs, anchors, counts = head_pass(model, cfg, images, targets)
    f = baseline(images, targets)
    torch.testing.assert_close(b.components["cls"], f.components["cls"], rtol=1e-9, atol=1e-12)
    # s_reg = 1: the regression term is Eq. 14, level by level
    _, reg = reference_levels(t, outputs, anchors, counts, "smooth_l1", 0.1, "per_image", s_cls=0.0, s_reg=1.0)
    torch.testing.assert_close(b.components["reg"], reg, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("normalization", "cls_weight"), [("per_image", 1.0), ("per_batch", 0.7)])
def test_bayesian_levels_are_eq16_and_eq14(normalization: str, cls_weight: float) -> None:
    """At s_cls = 0.7, s_reg = −0.4 each level's cls and reg term against Eq. 16 and Eq. 14 written out
    in float64 (``bayesian_reference``), with independently derived anchors and level counts."""
    cfg = bayes_cfg(S_CLS, S_REG, normalization=normalization, cls_weight=cls_weight)
    model = build(cfg)
    s_cls, s_reg = log_vars(model)
    assert (s_cls, s_reg) == (pytest.approx(S_CLS), pytest.approx(S_REG))
    images, targets = batch()
    ours, t, outputs, anchors, counts = head_pass(model, cfg, images, targets)
    with torch.no_grad():
        cls, reg = reference_levels(t, outputs, anchors, counts, "smooth_l1", 0.1, normalization, s_cls, s_reg)
        plain_cls, _ = reference_levels(t, outputs, anchors, counts, "smooth_l1", 0.1, normalization)
    assert int((reg != 0).sum()) >= 4, "the batch should put foreground on several levels"
    assert not torch.allclose(cls, plain_cls, rtol=1e-3), "s_cls = 0.7 must move the focal term"
    torch.testing.assert_close(ours.components["cls"], cls_weight * cls, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.components["reg"], reg, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.level_losses.detach(), cls_weight * cls + reg, rtol=1e-9, atol=1e-12)


def test_bayesian_gradients_reach_log_variances() -> None:
    """d(Σ_i L_i)/ds_cls and d/ds_reg equal Σ over anchors of the hand-derived d Eq. 16/ds and d Eq. 14/ds."""
    cfg = bayes_cfg(S_CLS, S_REG, log_var_range=[-5.0, 5.0])
    model = build(cfg)
    s_cls, s_reg = log_vars(model)
    for s in (s_cls, s_reg):
        check_derivatives(s, 0.1)  # the hand derivatives against central differences of the formulas
    images, targets = batch()
    ours, t, outputs, anchors, counts = head_pass(model, cfg, images, targets)
    ours.level_losses.sum().backward()
    with torch.no_grad():
        d_cls, d_reg = reference_levels(
            t, outputs, anchors, counts, "smooth_l1", 0.1, "per_image", s_cls, s_reg, d_ds=True
        )
    assert model.log_variances is not None
    grads = {name: p.grad for name, p in model.log_variances.log_vars.items()}
    assert set(grads) == {"cls", "reg"} and all(g is not None for g in grads.values())
    torch.testing.assert_close(grads["cls"], d_cls.sum().to(grads["cls"].dtype), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grads["reg"], d_reg.sum().to(grads["reg"].dtype), rtol=1e-8, atol=1e-12)


def test_log_variances_only_when_bayesian() -> None:
    assert build_model(tiny_cfg(), NUM_CLASSES).log_variances is None
    lv = build_model(tiny_cfg(bayesian=True, box_loss="smooth_l1"), NUM_CLASSES).log_variances
    assert lv is not None and lv.as_dict() == {"cls": 0.0, "reg": 1.0}


def test_bayesian_with_l1_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"box_loss=l1.*smooth_l1"):
        build_model(tiny_cfg(bayesian=True, box_loss="l1"), NUM_CLASSES)


# --- eval and errors ---------------------------------------------------------------------------------


def test_eval_matches_torchvision_in_input_coordinates() -> None:
    cfg = tiny_cfg()
    cfg.model.score_thresh = 0.0  # keep low-scoring boxes too, so every image has detections
    model = build(cfg).eval()
    tv = torchvision_twin(model, cfg, "l1").eval()
    images = [torch.rand(3, 64, 80, dtype=torch.float64), torch.rand(3, 150, 90, dtype=torch.float64)]
    with torch.no_grad():
        ours, theirs = model(images), tv(images)
    for img, o, t in zip(images, ours, theirs, strict=True):
        h, w = img.shape[-2:]
        assert set(o) == {"boxes", "scores", "labels"} and len(o["boxes"]) > 0
        for k in o:
            torch.testing.assert_close(o[k], t[k])
        # torchvision rescales with a float32 ratio: 120 px · (80 / 120) can come back as 80.000004
        tol = 1e-3
        assert (o["boxes"][:, 0::2] <= w + tol).all() and (o["boxes"][:, 1::2] <= h + tol).all()
        assert (o["boxes"] >= 0).all()
        assert o["labels"].min() >= 0 and o["labels"].max() < NUM_CLASSES
    # the second image is 150 px tall, 128 px once resized: boxes come back in the 150 px frame
    assert float(ours[1]["boxes"][:, 3].max()) > 128


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


def test_unimplemented_detector_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from robustdet.models import DETECTORS

    # every name the config accepts is implemented now: take one out of the table to see the message
    monkeypatch.delitem(DETECTORS, "fcos")
    cfg = tiny_cfg()
    with pytest.raises(NotImplementedError, match=r"fcos.*available: .*retinanet"):
        build_model(cfg.model_copy(update={"model": FCOSConfig()}), NUM_CLASSES)


def test_cpu_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import robustdet.models.dense as retinanet_module

    cfg = tiny_cfg(bayesian=True, box_loss="smooth_l1")
    model = build(cfg)
    images, targets = batch()
    _, t, outputs, anchors, counts = head_pass(model, cfg, images, targets)
    outputs = {k: v.detach().requires_grad_(True) for k, v in outputs.items()}
    whole = model.compute_level_losses(t, outputs, anchors, counts)
    grads = torch.autograd.grad(
        whole.level_losses.sum(), [outputs["cls_logits"], *model.log_variances.parameters()]
    )
    monkeypatch.setattr(retinanet_module, "CPU_CHUNK_ELEMENTS", 100)  # many chunks, the last one partial
    chunked = model.compute_level_losses(t, outputs, anchors, counts)
    grads_chunked = torch.autograd.grad(
        chunked.level_losses.sum(), [outputs["cls_logits"], *model.log_variances.parameters()]
    )
    torch.testing.assert_close(chunked.level_losses, whole.level_losses, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_chunked, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
