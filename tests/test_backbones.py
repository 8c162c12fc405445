"""Backbones with FPN: levels, channels, freezing, weights files and names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from robustdet.models import RetinaNetConfig as ModelConfig
from robustdet.models.backbones import BACKBONES, PYRAMIDS, TinyBody, build_backbone, freeze_layers


def _cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = {"backbone": "resnet18", "fpn_channels": 16}
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "tiny"])
@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
def test_forward_levels_strides_channels(name: str, pyramid: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(_cfg(backbone=name), pyramid).eval()
    spec = PYRAMIDS[pyramid]
    with torch.no_grad():
        out = list(backbone(torch.rand(1, 3, 128, 128)).values())
    assert len(out) == len(spec.level_names)
    first = int(spec.level_names[0][1:])
    for k, f in enumerate(out):
        assert f.shape == (1, 16, 128 >> (first + k), 128 >> (first + k)), (k, f.shape)


@pytest.mark.parametrize("name", ["resnet34", "resnet50", "resnet101"])
def test_larger_resnets_build(name: str) -> None:
    backbone = build_backbone(_cfg(backbone=name, fpn_channels=32), "p3p7")
    assert backbone.out_channels == 32
    c5 = 512 if name == "resnet34" else 2048
    assert [b[0].in_channels for b in backbone.fpn.inner_blocks] == [c5 // 4, c5 // 2, c5]
    assert backbone.fpn.extra_blocks.p6.in_channels == c5  # P6 from C5


def test_every_backbone_is_in_the_table() -> None:
    assert set(BACKBONES) == {"resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "tiny"}


def test_tiny_body_is_test_sized_and_wired_like_a_resnet() -> None:
    backbone = build_backbone(_cfg(backbone="tiny"), "p3p7")
    assert 1_000 < sum(p.numel() for p in backbone.body.parameters()) < 10_000
    # C3-C5 are layer2-layer4's outputs (TinyBody.widths), P6 from C5 as for a ResNet
    assert [b[0].in_channels for b in backbone.fpn.inner_blocks] == [16, 16, 16]
    assert backbone.fpn.extra_blocks.use_P5 is False
    p2 = build_backbone(_cfg(backbone="tiny"), "p2p6")
    assert [b[0].in_channels for b in p2.fpn.inner_blocks] == [8, 16, 16, 16]


@pytest.mark.parametrize(("layers", "frozen"), [(0, 5), (2, 3), (5, 0)])
def test_tiny_freezing_rule_counts_stages_from_the_top(layers: int, frozen: int) -> None:
    body = TinyBody()
    freeze_layers(body, "tiny", layers)
    trained = [name for name, stage in body.named_children() if all(p.requires_grad for p in stage.parameters())]
    assert trained == ["stem", "layer1", "layer2", "layer3", "layer4"][frozen:]


def test_tiny_has_no_torchvision_weights() -> None:
    with pytest.raises(ValueError, match="tiny has no torchvision weights"):
        build_backbone(_cfg(backbone="tiny", backbone_weights="ResNet18_Weights.IMAGENET1K_V1"), "p3p7")


def test_p6_from_c5_even_when_channels_agree() -> None:
    # resnet18's C5 has 512 channels: torchvision would silently switch to P5 for a 512-channel FPN
    backbone = build_backbone(_cfg(fpn_channels=512), "p3p7")
    assert backbone.fpn.extra_blocks.use_P5 is False
    assert build_backbone(_cfg(), "p3p7_from_p5").fpn.extra_blocks.use_P5 is True


def test_no_weights_means_batchnorm_and_all_trainable() -> None:
    backbone = build_backbone(_cfg(trainable_backbone_layers=1), "p3p7")
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.body.modules())
    assert all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("layers", [0, 2, 5])
def test_freezing_rule_matches_torchvision_resnet(layers: int) -> None:
    ours = resnet18()
    freeze_layers(ours, "resnet", layers)
    theirs = _resnet_fpn_extractor(resnet18(), layers)
    # fc is not part of the FPN body
    frozen_ours = {n for n, p in ours.named_parameters() if not p.requires_grad and not n.startswith("fc.")}
    frozen_theirs = {n for n, p in theirs.body.named_parameters() if not p.requires_grad}
    assert frozen_ours == frozen_theirs


@pytest.mark.parametrize("layers", [0, 3, 6])
def test_freezing_rule_matches_torchvision_mobilenet(layers: int) -> None:
    ours = mobilenet_v3_large()
    freeze_layers(ours, "mobilenet", layers)
    theirs = _mobilenet_extractor(mobilenet_v3_large(), True, layers)
    frozen_ours = {
        n.removeprefix("features.")
        for n, p in ours.features.named_parameters(prefix="features")
        if not p.requires_grad
    }
    frozen_theirs = {n for n, p in theirs.body.named_parameters() if not p.requires_grad}
    assert frozen_ours == frozen_theirs


def test_local_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone(_cfg(), "p3p7")
    path = tmp_path / "body.pth"
    torch.save(source.body.state_dict(), path)
    loaded = build_backbone(_cfg(backbone_weights=str(path), trainable_backbone_layers=3), "p3p7")
    # pretrained: frozen statistics, and only the last three stages train
    assert any(isinstance(m, FrozenBatchNorm2d) for m in loaded.body.modules())
    assert not loaded.body.conv1.weight.requires_grad and loaded.body.layer4[0].conv1.weight.requires_grad
    theirs = loaded.body.state_dict()
    for k, v in source.body.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(theirs[k], v, rtol=0, atol=0)


def test_classifier_checkpoint_is_accepted(tmp_path: Path) -> None:
    # a torchvision classification state dict (with its fc head) loads into the FPN body
    net = resnet18()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(net.state_dict(), path)
    loaded = build_backbone(_cfg(backbone_weights=str(path)), "p3p7")
    torch.testing.assert_close(loaded.body.conv1.weight, net.conv1.weight, rtol=0, atol=0)


def test_wrong_weights_file_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(1), "something.else": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"other\.pth.*missing keys.*unexpected keys: something\.else"):
        build_backbone(_cfg(backbone_weights=str(path)), "p3p7")


def test_missing_weights_file() -> None:
    with pytest.raises(ValueError, match="no such file"):
        build_backbone(_cfg(backbone_weights="/nonexistent/resnet18.pth"), "p3p7")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ResNet18_Weights.NOPE", "neither an existing file nor a torchvision weights name"),
        ("NoSuchNet_Weights.IMAGENET1K_V1", "neither an existing file nor a torchvision weights name"),
        ("ResNet50_Weights.IMAGENET1K_V1", "weights of another network; resnet18 takes ResNet18_Weights"),
    ],
)
def test_bad_weights_name_is_a_clear_error(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone(_cfg(backbone_weights=name), "p3p7")
