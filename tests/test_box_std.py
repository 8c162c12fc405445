"""bbox_std: σ of (x1, y1, x2, y2) from the heads' α = log σ², through each detector's box coder.

The propagation (models/box_std.py) is checked against the Jacobian of torchvision's own decoders
(autograd, float64) and against Monte Carlo samples; the dense post-processing with a stand-in head that
adds ``bbox_log_var`` against the plain post-processing and the rescaling to the original image.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.models.detection._utils import BoxLinearCoder

from robustdet.config import Config, config_from_dict
from robustdet.models import build_model
from robustdet.models.box_std import delta_std, distance_std, std_per_image

CLIP = math.log(1000 / 16)


def random_case(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200
    wh = 4 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 100
    anchors = torch.cat([xy, xy + wh], dim=1)
    deltas = torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.7
    log_var = torch.rand(n, 4, generator=g, dtype=torch.float64) * 6 - 5
    return anchors, deltas, log_var


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_delta_std_is_the_first_order_propagation_through_torchvisions_decoder(weights: tuple) -> None:
    """σ²_k = Σ_j (∂x_k/∂t_j)² σ²_j with the Jacobian of torchvision's decode_single by autograd."""
    anchors, deltas, log_var = random_case(12, 0)
    deltas[0, 2] = 5.0 * CLIP  # past the clamp: the width no longer moves with t_w
    coder = TorchvisionBoxCoder(weights)
    want = []
    for a, d, lv in zip(anchors, deltas, log_var, strict=True):
        jac = torch.autograd.functional.jacobian(lambda t, a=a: coder.decode_single(t[None], a[None])[0], d)
        want.append((jac.square() @ lv.exp()).sqrt())
    got = delta_std(log_var, deltas, anchors, weights, CLIP)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)
    # past the clamp only t_x moves x1: σ = w_a / w_x · σ_x
    wa = anchors[0, 2] - anchors[0, 0]
    torch.testing.assert_close(got[0, 0], wa / weights[0] * (0.5 * log_var[0, 0]).exp())


def test_delta_std_against_monte_carlo() -> None:
    """Small σ (α −9 .. −7 on the deltas): the sample σ of decoded corners agrees to 3 %."""
    anchors, deltas, _ = random_case(6, 1)
    log_var = torch.linspace(-9, -7, 24, dtype=torch.float64).view(6, 4)
    coder = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0))
    g = torch.Generator().manual_seed(2)
    samples = deltas + torch.randn(20000, 6, 4, generator=g, dtype=torch.float64) * (0.5 * log_var).exp()
    boxes = coder.decode_single(samples.reshape(-1, 4), anchors.repeat(20000, 1)).view(20000, 6, 4)
    torch.testing.assert_close(delta_std(log_var, deltas, anchors, coder.weights), boxes.std(dim=0), rtol=0.03, atol=0)


def test_distance_std_is_exact_for_fcos() -> None:
    """FCOS's corners are linear in (l, t, r, b): Monte Carlo with large σ agrees, and σ_x1 = s·σ_l."""
    anchors, _, log_var = random_case(5, 3)
    distances = torch.rand(5, 4, dtype=torch.float64) * 3 + 1
    coder = BoxLinearCoder(normalize_by_size=True)
    g = torch.Generator().manual_seed(4)
    samples = distances + torch.randn(20000, 5, 4, generator=g, dtype=torch.float64) * (0.5 * log_var).exp()
    boxes = coder.decode(samples, anchors.expand(20000, 5, 4))
    got = distance_std(log_var, anchors)
    torch.testing.assert_close(got, boxes.std(dim=0), rtol=0.03, atol=0)
    s = anchors[:, 2] - anchors[:, 0]
    torch.testing.assert_close(got[:, 0], s * (0.5 * log_var[:, 0]).exp(), rtol=1e-14, atol=0)


# --- the dense post-processing with a stand-in head ----------------------------------------------

NUM_CLASSES = 3
STRIDES = (8, 16, 32, 64, 128)


class StandInHead(nn.Module):
    """The model's head plus ``bbox_log_var`` [B, A, 4]: one α per pyramid level (``level_log_var``)."""

    def __init__(self, head: nn.Module, level_log_var: list[float], per_location: int) -> None:
        super().__init__()
        self.head = head
        self.level_log_var = level_log_var
        self.per_location = per_location
        self.box_coder = getattr(head, "box_coder", None)  # FCOS decodes with its head's coder

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        out = self.head(features)
        reg = out["bbox_regression"]
        values = [
            torch.full((reg.shape[0], f.shape[-2] * f.shape[-1] * self.per_location, 4), a, dtype=reg.dtype)
            for f, a in zip(features, self.level_log_var, strict=True)
        ]
        out["bbox_log_var"] = torch.cat(values, dim=1)
        return out


def dense_cfg(name: str, **model: object) -> Config:
    section: dict[str, object] = {
        "name": name, "backbone": "resnet18", "fpn_channels": 16, "head_norm": "group_norm",
        "group_norm_groups": 4, "min_size": 64, "max_size": 64, "score_thresh": 0.0, "box_uncertainty": True,
        **model,
    }
    if name == "retinanet":
        section["anchor_sizes"] = [8, 16, 32, 64, 128]
    return config_from_dict({"model": section, "loss": {"box_loss": "l1"}})


def build_pair(cfg: Config, level_log_var: list[float]) -> tuple[nn.Module, nn.Module]:
    # the plain model has no α layers; the stand-in head supplies α to a copy of it
    plain_model = cfg.model.model_copy(update={"box_uncertainty": False, "var_voting": False})
    plain_cfg = cfg.model_copy(update={"model": plain_model})
    torch.manual_seed(0)
    plain = build_model(plain_cfg, NUM_CLASSES).eval()
    with torch.no_grad():
        for p in plain.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if cfg.model.name == "fcos":  # distances of about a stride, so that neighbouring boxes overlap
            plain.head.regression_head.bbox_reg.bias.add_(1.0)
    torch.manual_seed(0)
    uncertain = build_model(cfg, NUM_CLASSES).eval()
    missing, unexpected = uncertain.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("log_var" in k or k == "box_uncertainty_iter" for k in missing), missing
    per_location = uncertain.anchor_generator.num_anchors_per_location()[0]
    uncertain.head = StandInHead(uncertain.head, level_log_var, per_location)
    return plain, uncertain


def images() -> list[Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, 128, 96, generator=g), torch.rand(3, 64, 64, generator=g)]  # resized 2x and 1x


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_stand_in_head_gives_the_plain_detections_plus_bbox_std(name: str) -> None:
    level_log_var = [-2.0, -1.0, 0.0, 1.0, 2.0]
    plain, uncertain = build_pair(dense_cfg(name), level_log_var)
    with torch.no_grad():
        want, got = plain(images()), uncertain(images())
    # resized (H, W): 128x96 -> 64x48, 64x64 stays
    for w, d, scale, resized in zip(want, got, (2.0, 1.0), ((64, 48), (64, 64)), strict=True):
        assert "bbox_std" not in w and len(d["boxes"]) > 10
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(w[key], d[key]), key
        std = d["bbox_std"]
        assert std.shape == d["boxes"].shape and std.dtype == torch.float32 and bool((std > 0).all())
        if name == "fcos":
            # σ = s·e^{α/2} exactly, s the level's stride, times the resize back to the original image:
            # every σ is one of the five levels' values
            per_level = torch.tensor([s * math.exp(a / 2) * scale for s, a in zip(STRIDES, level_log_var, strict=True)])
            nearest = (std[..., None] - per_level).abs().min(dim=-1).values
            assert float(nearest.max()) < 1e-4 * float(per_level.max())
        else:
            # σ_x1 = e^{α/2}·sqrt(w_a² + (w/2)²), in resized pixels; w the predicted width. Boxes clipped by
            # the image have lost their predicted width, so only unclipped ones are checked
            check_retinanet_std(d["boxes"] / scale, std / scale, resized, level_log_var, uncertain)


def check_retinanet_std(
    boxes: Tensor, std: Tensor, size: tuple[int, int], level_log_var: list[float], model: nn.Module
) -> None:
    h, w = size
    inside = (boxes[:, 0] > 0.01) & (boxes[:, 2] < w - 0.01) & (boxes[:, 1] > 0.01) & (boxes[:, 3] < h - 0.01)
    assert int(inside.sum()) > 3
    w = boxes[inside, 2] - boxes[inside, 0]
    sx = std[inside, 0]
    # [levels, anchors per location]: the widths of torchvision's cell anchors (rounded to whole pixels)
    widths = torch.stack([(c[:, 2] - c[:, 0]).double() for c in model.anchor_generator.cell_anchors])
    ok = torch.zeros(len(w), dtype=torch.bool)
    for level, a in enumerate(level_log_var):
        predicted = math.exp(a / 2) * torch.sqrt(widths[level][None, :] ** 2 + (w[:, None] / 2) ** 2)
        ok |= ((predicted - sx[:, None]).abs() < 1e-3 * predicted).any(dim=1)
    assert bool(ok.all()), "a σ_x1 fits no anchor width of any level"


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_var_voting_moves_boxes_not_scores(name: str) -> None:
    cfg = dense_cfg(name, var_voting=True)
    plain, uncertain = build_pair(cfg, [0.0] * 5)
    assert uncertain.var_voting_sigma_t == cfg.model.var_voting_sigma_t == 0.02
    with torch.no_grad():
        want, got = plain(images()), uncertain(images())
    moved = 0
    for w, d in zip(want, got, strict=True):
        assert torch.equal(w["scores"], d["scores"]) and torch.equal(w["labels"], d["labels"])
        moved += int((w["boxes"] - d["boxes"]).abs().amax(dim=1).gt(1e-3).sum())
        # voted boxes are weighted means of clipped candidates: still inside the image
        assert float(d["boxes"].min()) >= -1e-4, float(d["boxes"].min())
    assert moved > 0


def test_var_voting_needs_box_uncertainty() -> None:
    with pytest.raises(ValueError, match=r"model\.var_voting=true needs model\.box_uncertainty=true"):
        dense_cfg("retinanet", var_voting=True, box_uncertainty=False)


# --- Faster R-CNN: class-specific α through the box head's coder ----------------------------------


class StandInPredictor(nn.Module):
    """The box predictor plus α [R, 4·(C+1)] in ``bbox_pred``'s layout: ``class_log_var[c]`` for class c."""

    def __init__(self, predictor: nn.Module, class_log_var: list[float]) -> None:
        super().__init__()
        self.predictor = predictor
        self.class_log_var = class_log_var

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, deltas = self.predictor(x)[:2]  # the real α, if any, is replaced
        alpha = torch.tensor(self.class_log_var, dtype=deltas.dtype).repeat_interleave(4)
        return logits, deltas, alpha.expand_as(deltas)


def faster_rcnn_pair(class_log_var: list[float], **model: object) -> tuple[nn.Module, nn.Module]:
    cfg = config_from_dict({"model": {
        "name": "faster_rcnn", "backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64,
        "anchor_sizes": [6.0, 12.0, 24.0, 48.0, 96.0], "anchor_scales": [1.0], "score_thresh": 0.0,
        "box_uncertainty": True, **model,
    }})
    # the plain model has no α layers; the stand-in head supplies α to a copy of it
    plain_model = cfg.model.model_copy(update={"box_uncertainty": False, "var_voting": False})
    plain_cfg = cfg.model_copy(update={"model": plain_model})
    torch.manual_seed(0)
    plain = build_model(plain_cfg, NUM_CLASSES).eval()
    with torch.no_grad():
        for p in [*plain.rpn.head.parameters(), *plain.roi_heads.box_predictor.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    uncertain = build_model(cfg, NUM_CLASSES).eval()
    missing, unexpected = uncertain.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("log_var" in k or k == "box_uncertainty_iter" for k in missing), missing
    uncertain.roi_heads.box_predictor = StandInPredictor(uncertain.roi_heads.box_predictor, class_log_var)
    return plain, uncertain


def test_faster_rcnn_bbox_std_takes_the_detections_own_class() -> None:
    """Raising α of class 2 (label 1) by 2 multiplies σ of exactly the label-1 detections by e."""
    plain, base = faster_rcnn_pair([0.0] * (NUM_CLASSES + 1))
    _, raised = faster_rcnn_pair([0.0, 0.0, 2.0, 0.0])
    with torch.no_grad():
        want, got_base, got_raised = plain(images()), base(images()), raised(images())
    for w, a, b in zip(want, got_base, got_raised, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(w[key], a[key]) and torch.equal(w[key], b[key]), key
        found = set(w["labels"].tolist())
        assert len(w["labels"]) > 10 and 1 in found and len(found) > 1
        factor = torch.where(a["labels"] == 1, math.e, 1.0)[:, None]
        torch.testing.assert_close(b["bbox_std"], a["bbox_std"] * factor, rtol=1e-5, atol=0)


def test_faster_rcnn_var_voting() -> None:
    plain, uncertain = faster_rcnn_pair([0.0] * (NUM_CLASSES + 1), var_voting=True)
    with torch.no_grad():
        want, got = plain(images()), uncertain(images())
    moved = 0
    for w, d in zip(want, got, strict=True):
        assert torch.equal(w["scores"], d["scores"]) and torch.equal(w["labels"], d["labels"])
        moved += int((w["boxes"] - d["boxes"]).abs().amax(dim=1).gt(1e-3).sum())
    assert moved > 0


def test_coco_results_carry_bbox_std_rounded() -> None:
    from robustdet.engine.evaluator import to_coco_results

    boxes = torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 6.0, 7.0]])
    std = torch.tensor([[0.12345, 1.0, 2.0, 3.0005], [4.0, 5.0, 6.0, 7.0]])
    det = {"boxes": boxes, "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0]), "bbox_std": std}
    got = to_coco_results([det, {k: v[:0] for k, v in det.items()}], [3, 4], [10, 20])
    assert [r["bbox_std"] for r in got] == [[0.123, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    assert got[0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and got[0]["category_id"] == 20
    plain = {k: v for k, v in det.items() if k != "bbox_std"}
    assert "bbox_std" not in to_coco_results([plain], [3], [10, 20])[0]


def test_predict_drawing_shows_sigma_bands() -> None:
    """A sure box is one line; an unsure one gets lines at ±σ outside and inside its sides."""
    from robustdet.engine.inference import draw_detections, relative_std

    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    boxes = torch.tensor([[20.0, 20.0, 80.0, 80.0]])
    plain = draw_detections(image, boxes, ["a"], [(255, 0, 0)], None)
    drawn = draw_detections(image, boxes, ["a"], [(255, 0, 0)], torch.full((1, 4), 6.0))
    row = 50  # a row through the box's middle, away from the label
    assert plain[0, row].nonzero().flatten().tolist() == [20, 21, 79, 80]
    assert {14, 26, 74, 86} <= set(drawn[0, row].nonzero().flatten().tolist())
    torch.testing.assert_close(relative_std(boxes, torch.full((1, 4), 6.0)), torch.tensor([0.1]))


def test_std_per_image_equals_one_call_per_image():
    """The batch's σ in one call: each image's rows are those of its own call, for the kept candidates
    (an index) and for all of them (None, as voting needs), with images of different sizes, one empty."""
    cases = [random_case(n, seed) for n, seed in ((7, 1), (0, 2), (12, 3))]
    inputs = [[log_var.float(), deltas.float(), anchors.float()] for anchors, deltas, log_var in cases]
    std = partial(delta_std, weights=(10.0, 10.0, 5.0, 5.0))
    index = [torch.tensor([4, 0, 6]), torch.zeros(0, dtype=torch.long), None]
    got = std_per_image(std, inputs, index)
    assert [g.shape[0] for g in got] == [3, 0, 12]
    for g, xs, ix in zip(got, inputs, index, strict=True):
        want = std(*(x if ix is None else x[ix] for x in xs))
        torch.testing.assert_close(g, want, rtol=1e-6, atol=0)
    # one image: the per-image call itself (what an export's trace of one image records)
    (alone,) = std_per_image(std, inputs[2:], [None])
    assert torch.equal(alone, std(*inputs[2]))
