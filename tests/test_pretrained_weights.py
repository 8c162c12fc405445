"""model.weights: torchvision detection state dicts and robustdet checkpoints as a starting point.

The torchvision models are built locally (nothing is downloaded), their tensors randomised so that no
loaded tensor can pass for the model's own initialisation, their BatchNorm layers frozen the way
torchvision's trained (published) models have them, and saved like the files torchvision publishes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import detection as tvd
from torchvision.ops import FrozenBatchNorm2d

from robustdet.cli import main as cli_main
from robustdet.config import Config, load_config
from robustdet.engine.trainer import Trainer
from robustdet.errors import CheckpointError
from robustdet.models import RetinaNetConfig, build_model
from robustdet.models.anchors import build_anchor_generator
from robustdet.models.weights import load_detector_weights
from tests.conftest import REPO, tiny_overrides

SIZE = 96  # images and min_size/max_size: the smallest that keeps every pyramid level > 1 px
CLASSES = 5
# robustdet's eval defaults, given to torchvision's constructors so that both post-process alike
SCORE, NMS, DETS, TOPK = 0.05, 0.5, 100, 1000


def _frozen(module: nn.Module) -> None:
    """Replace BatchNorm2d by FrozenBatchNorm2d in place, as torchvision's trained detectors have it."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _frozen(child)


def _randomise(model: nn.Module, seed: int) -> None:
    """Move every tensor off its initial value, the way training would.

    Parameters get noise and the classification biases a spread (so that scores pass 0.05 without
    saturating); the BatchNorm statistics are then measured on random images (cumulative average) and the
    residual branches scaled down, which keeps the features small as in a trained network instead of
    growing through 16 blocks.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("cls_logits.bias") or key.endswith("cls_score.bias"):
                p.copy_(torch.empty(p.shape).uniform_(-3.0, 1.0, generator=g))
            else:  # noise of a tenth of the tensor's spread, so that no layer's gain changes much
                spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.2
                p.add_(0.1 * spread * torch.randn(p.shape, generator=g))
            if key.endswith("bn3.weight"):  # small residual branches, as trained ResNets have them
                p.mul_(0.2)
        body = model.backbone.body  # type: ignore[union-attr]
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        body.train()
        body(torch.rand(4, 3, 64, 64, generator=g))


SMALL = ["model.backbone=resnet18", "model.fpn_channels=16", "model.head_norm=none"]  # for the error tests
# robustdet's RetinaNet anchors keep 32 · 2^(1/3) = 40.32 where torchvision's _default_anchorgen truncates
# to 40 (docs/models.md): the torchvision reference gets robustdet's generator, so that the comparison is
# of the weights alone. FCOS's points and Faster R-CNN's single-scale anchors are the same in both.
_M = RetinaNetConfig()
# name -> (torchvision constructor, its anchor and post-processing kwargs, robustdet overrides matching it)
DETECTORS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], list[str]]] = {
    "retinanet": (
        tvd.retinanet_resnet50_fpn_v2,
        {
            "score_thresh": SCORE, "nms_thresh": NMS, "detections_per_img": DETS, "topk_candidates": TOPK,
        },
        ["model.head_norm=group_norm"],
    ),
    "fcos": (
        tvd.fcos_resnet50_fpn,
        {"score_thresh": SCORE, "nms_thresh": NMS, "detections_per_img": DETS, "topk_candidates": TOPK},
        ["model.head_norm=group_norm"],
    ),
    "faster_rcnn": (
        tvd.fasterrcnn_resnet50_fpn,
        {"box_score_thresh": SCORE, "box_nms_thresh": NMS, "box_detections_per_img": DETS},
        ["model.head_norm=none", "model.anchor_scales=[1.0]"],
    ),
}


def _torchvision(name: str, num_classes: int = CLASSES, seed: int = 0) -> nn.Module:
    ctor, post, _ = DETECTORS[name]
    # torchvision's Faster R-CNN counts the background class, as robustdet's predictor does
    outputs = num_classes + 1 if name == "faster_rcnn" else num_classes
    model = ctor(weights=None, weights_backbone=None, num_classes=outputs, min_size=SIZE, max_size=SIZE, **post)
    if name == "retinanet":
        model.anchor_generator = build_anchor_generator(_M.anchor_sizes, _M.anchor_scales, _M.aspect_ratios)
    _randomise(model, seed)
    _frozen(model)
    return model.eval()


def _config(name: str, weights: Path | None, extra: list[str] | tuple[str, ...] = ()) -> Config:
    overrides = [
        f"model.name={name}",
        "model.backbone=resnet50",
        "model.fpn_channels=256",
        f"model.min_size={SIZE}",
        f"model.max_size={SIZE}",
        f"model.score_thresh={SCORE}",
        f"model.nms_thresh={NMS}",
        f"model.detections_per_img={DETS}",
        *([f"model.topk_candidates={TOPK}"] if name != "faster_rcnn" else []),  # a dense detectors' key
        *DETECTORS[name][2],
        *extra,
    ]
    if weights is not None:
        overrides.append(f"model.weights={weights}")
    return load_config(None, overrides)


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def torchvision_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """A torchvision R50 detector's weights file (130 to 170 MB), removed once its detector's tests are done."""
    torch.manual_seed(0)
    name = request.param
    model = _torchvision(name)
    path = tmp_path_factory.mktemp(name) / f"{name}_torchvision.pth"
    torch.save(model.state_dict(), path)
    yield name, model, path
    path.unlink()


def _counted(state: dict[str, Tensor]) -> list[str]:
    return [k for k in state if not k.endswith("num_batches_tracked")]


def test_torchvision_weights_give_torchvision_detections(torchvision_file: tuple) -> None:
    name, reference, path = torchvision_file
    model = build_model(_config(name, path), CLASSES)
    report = load_detector_weights(model, path, CLASSES)
    file_state = reference.state_dict()  # what was saved
    ours = model.state_dict()
    # every tensor of the model came from the file, under the same name
    assert report.loaded == _counted(ours)
    assert sorted(report.loaded) == sorted(_counted(file_state))
    assert (report.reinitialised, report.missing, report.unexpected) == ([], [], [])
    assert all(torch.equal(ours[k], file_state[k]) for k in report.loaded)
    assert f"loaded {len(report.loaded)} tensors from {path}" in report.line()

    model.eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE - 24, SIZE, generator=g)]
    with torch.no_grad():
        expected, got = reference(images), model(images)
    for exp, out in zip(expected, got, strict=True):
        assert len(exp["boxes"]) > 5  # detections to compare, not an empty list on both sides
        # robustdet's labels are 0..C-1; torchvision's Faster R-CNN keeps 0 for the background
        shift = 1 if name == "faster_rcnn" else 0
        assert torch.equal(out["labels"] + shift, exp["labels"])
        torch.testing.assert_close(out["scores"], exp["scores"])
        torch.testing.assert_close(out["boxes"], exp["boxes"])


def test_other_class_count_reinitialises_only_the_classifier(torchvision_file: tuple) -> None:
    name, reference, path = torchvision_file
    torch.manual_seed(3)
    model = build_model(_config(name, path), 3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_detector_weights(model, path, 3)
    file_state = reference.state_dict()
    ours = model.state_dict()
    prefix = "roi_heads.box_predictor." if name == "faster_rcnn" else "head.classification_head.cls_logits."
    classifier = [k for k in _counted(ours) if k.startswith(prefix)]
    # weight and bias; Faster R-CNN's predictor has them for the class scores and the per-class boxes
    assert report.reinitialised == classifier and len(classifier) == (4 if name == "faster_rcnn" else 2)
    assert (report.file_classes, report.model_classes) == (CLASSES, 3)
    assert f"re-initialised {len(classifier)} ({classifier[0]}, {classifier[1]}" in report.line()
    assert "the file has 5 classes, the model 3" in report.line()
    assert report.loaded == [k for k in _counted(ours) if k not in classifier]
    assert all(torch.equal(ours[k], file_state[k]) for k in report.loaded)
    assert all(torch.equal(ours[k], fresh[k]) for k in classifier)
    if name != "faster_rcnn":  # the focal-loss prior: every class starts at probability 0.01
        bias = ours[f"{prefix}bias"]
        torch.testing.assert_close(bias, torch.full_like(bias, -math.log((1 - 0.01) / 0.01)))


def test_retinanet_v1_file_reinitialises_p6_p7(tmp_path: Path) -> None:
    # torchvision's retinanet_resnet50_fpn computes P6 from P5 (a 256-channel input), robustdet's from C5
    reference = tvd.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=CLASSES)
    _randomise(reference, 5)
    _frozen(reference)
    path = tmp_path / "retinanet_v1.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(_config("retinanet", path, ["model.head_norm=none"]), CLASSES)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_detector_weights(model, path, CLASSES)
    extra = [k for k in _counted(fresh) if k.startswith("backbone.fpn.extra_blocks.")]
    assert report.reinitialised == extra and len(extra) == 4  # p6, p7: weight and bias
    assert "P6 from P5" in report.line()
    ours, file_state = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], fresh[k]) for k in extra)
    assert all(torch.equal(ours[k], file_state[k]) for k in report.loaded)
    assert len(report.loaded) == len(_counted(ours)) - 4


def test_another_backbone_is_a_one_line_error(tmp_path: Path) -> None:
    # a ResNet-50 RetinaNet's names and shapes (torchvision's body names), built on the meta device: no init
    with torch.device("meta"):
        big = build_model(_config("retinanet", None, [*SMALL, "model.backbone=resnet50"]), 2)
    path = tmp_path / "r50.pth"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in big.state_dict().items()}, path)
    small = build_model(_config("retinanet", path, SMALL), 2)
    with pytest.raises(CheckpointError) as info:
        load_detector_weights(small, path, 2)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    # the first key whose shape differs: layer1.0.conv1 is 1x1 in a bottleneck, 3x3 in a basic block
    assert "backbone.body.layer1.0.conv1.weight has shape (64, 64, 1, 1) in the file, (64, 64, 3, 3)" in message


def test_head_without_groupnorm_names_the_switch(tmp_path: Path) -> None:
    path = tmp_path / "plain_head.pth"
    torch.save(build_model(_config("retinanet", None, SMALL), 2).state_dict(), path)
    grouped = [*SMALL, "model.head_norm=group_norm", "model.group_norm_groups=4"]
    model = build_model(_config("retinanet", path, grouped), 2)
    first = r"missing, first head\.classification_head\.conv\.0\.1\.weight"
    with pytest.raises(CheckpointError, match=first + r".*set model\.head_norm=none"):
        load_detector_weights(model, path, 2)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    model = build_model(_config("retinanet", None, SMALL), 2)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        load_detector_weights(model, tmp_path / "nope.pth", 2)


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    model = build_model(_config("retinanet", None, SMALL), 2)
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_detector_weights(model, path, 2)
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"cannot read model\.weights as a state dict \(Unsupported operand"):
        load_detector_weights(model, path, 2)
    torch.save({"model": {"x": torch.zeros(1)}, "hook": print}, path)  # a function: refused, never imported
    reason = r"\(Unsupported global: GLOBAL print was not an allowed global by default\)$"
    with pytest.raises(CheckpointError, match=r"refused: .*" + reason):
        load_detector_weights(model, path, 2)


def _run_setup_only(cfg: Config, out: Path, monkeypatch: pytest.MonkeyPatch, save: bool) -> tuple[dict, str]:
    """Trainer.train() up to the loop: the model as the loop would start it, and what went to the console."""
    seen: dict[str, dict[str, Tensor]] = {}

    def loop(self: Trainer) -> None:
        seen["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if save:
            self._save(0)  # the trainer's own checkpoint (trainer._state), as a finished run leaves it

    monkeypatch.setattr(Trainer, "_loop", loop)
    console = io.StringIO()
    Trainer(cfg, out, console=console).train()
    return seen["model"], console.getvalue()


def test_trainer_starts_from_a_robustdet_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_config(None, tiny_overrides(tmp_path, {"loss.bayesian": "true", "train.max_iter": 1}))
    first_model, _ = _run_setup_only(first, tmp_path / "a", monkeypatch, save=True)
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    # another run, on data with 3 classes instead of 5, not Bayesian: it starts from the first run's model
    second = load_config(
        None,
        tiny_overrides(tmp_path, {"train.max_iter": 1, "model.weights": str(ckpt), "data.synthetic.num_classes": 3}),
    )
    model, console = _run_setup_only(second, tmp_path / "b", monkeypatch, save=False)
    (line,) = [x for x in console.splitlines() if x.startswith("model.weights:")]
    assert f"from {ckpt} (robustdet checkpoint)" in line
    assert "re-initialised 2 (head.classification_head.cls_logits.weight" in line
    assert "the file has 5 classes, the model 3" in line
    assert "unexpected 2 (log_variances.log_vars.cls, log_variances.log_vars.reg)" in line
    same = [k for k in _counted(model) if "cls_logits" not in k]
    assert same and all(torch.equal(model[k], first_model[k]) for k in same)


def test_cli_names_a_missing_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pth"
    argv = ["train", str(REPO / "configs" / "default.yaml"), *tiny_overrides(tmp_path, {"model.weights": str(missing)})]
    code = cli_main([*argv, "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"robustdet train: error: model.weights: no such file {missing}"]
