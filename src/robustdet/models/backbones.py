"""Backbones with a feature pyramid, assembled from torchvision's parts.

Every backbone but one is a torchvision classification network (ResNet-18/34/50/101, MobileNetV3-Large)
cut into stages by torchvision's ``BackboneWithFPN`` (an ``IntermediateLayerGetter`` plus a
``FeaturePyramidNetwork``). torchvision's ``_resnet_fpn_extractor`` / ``_mobilenet_extractor`` fix the
FPN at 256 channels, so this module builds ``BackboneWithFPN`` itself, with ``model.fpn_channels``
channels and the same layer-freezing rule as those extractors (a test holds the two rules equal).

``"tiny"`` is for tests and smoke runs only: five plain conv-BN-ReLU stages (``TinyBody``, about 6,000
parameters) at ResNet's strides 2-32 with ResNet's stage names, wired into the same ``BackboneWithFPN``
and pyramids, so that the whole detector trains, checkpoints and evaluates in a fraction of ResNet-18's
time and disk (11.7 M parameters). It detects little; it has no pretrained weights.

Pyramids (``PYRAMIDS``):

- ``"p3p7"`` (RetinaNet): P3-P5 from C3-C5, P6 and P7 from **C5** through torchvision's
  ``LastLevelP6P7``. C5 is what the RetinaNet paper, detectron2, MMDetection and torchvision's
  ``retinanet_resnet50_fpn_v2`` use; torchvision's v1 model takes P5 instead.
- ``"p3p7_from_p5"`` (FCOS, as its paper and torchvision's ``fcos_resnet50_fpn`` do).
- ``"p2p6"`` (Faster R-CNN): P2-P5 plus a max-pooled P6 (torchvision's ``LastLevelMaxPool``).

Normalisation layers: with no pretrained weights the body uses ``nn.BatchNorm2d``, because
``FrozenBatchNorm2d`` would freeze random statistics that never train; with pretrained weights
(``model.backbone_weights``, or a whole trained detector in ``model.weights``) it uses
``FrozenBatchNorm2d`` as torchvision's detection models do. Freezing layers of a randomly initialised
body is equally pointless, so without weights every layer trains whatever
``model.trainable_backbone_layers`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, resnet50, resnet101
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from robustdet.models.base import ModelSection


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one classification network and where its stages end."""

    constructor: Callable[..., nn.Module]
    family: str  # "resnet", "mobilenet" or "tiny": which freezing rule and stage layout applies
    # prefixes of the classification head, absent from the FPN body (dropped from a classifier checkpoint)
    head_prefixes: tuple[str, ...]


class TinyBody(nn.Module):
    """A test-sized body: a stride-2 stem, then ``layer1``-``layer4`` at strides 4-32 (ResNet's names).

    One 3x3 conv-norm-ReLU per stage, each halving the resolution; ``stage_channels`` gives C_k's width
    per stride, as ``inplanes`` does for a ResNet.
    """

    widths = (8, 8, 16, 16, 16)  # stem, layer1-layer4

    def __init__(self, weights: None = None, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if weights is not None:
            raise ValueError("model.backbone=tiny has no pretrained weights")
        names = ("stem", "layer1", "layer2", "layer3", "layer4")
        c_in = 3
        for name, c_out in zip(names, self.widths, strict=True):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
            self.add_module(name, nn.Sequential(conv, norm_layer(c_out), nn.ReLU(inplace=True)))
            c_in = c_out
        self.stage_channels = {2 ** (k + 1): c for k, c in enumerate(self.widths)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.children():
            x = stage(x)
        return x


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(resnet18, "resnet", ("fc.",)),
    "resnet34": BackboneSpec(resnet34, "resnet", ("fc.",)),
    "resnet50": BackboneSpec(resnet50, "resnet", ("fc.",)),
    "resnet101": BackboneSpec(resnet101, "resnet", ("fc.",)),
    "mobilenet_v3_large": BackboneSpec(mobilenet_v3_large, "mobilenet", ("classifier.",)),
    "tiny": BackboneSpec(TinyBody, "tiny", ()),  # tests and smoke runs
}


@dataclass(frozen=True)
class PyramidSpec:
    """Which backbone strides feed the FPN, and how the levels above C5 are made."""

    strides: tuple[int, ...]  # of the FPN inputs C_k: 2**k
    extra: str  # "p6p7_from_c5", "p6p7_from_p5" or "maxpool"
    level_names: tuple[str, ...]


PYRAMIDS: dict[str, PyramidSpec] = {
    "p3p7": PyramidSpec((8, 16, 32), "p6p7_from_c5", ("P3", "P4", "P5", "P6", "P7")),
    "p3p7_from_p5": PyramidSpec((8, 16, 32), "p6p7_from_p5", ("P3", "P4", "P5", "P6", "P7")),
    "p2p6": PyramidSpec((4, 8, 16, 32), "maxpool", ("P2", "P3", "P4", "P5", "P6")),
}

RESNET_TRAINABLE = ("layer4", "layer3", "layer2", "layer1", "conv1")
TINY_TRAINABLE = ("layer4", "layer3", "layer2", "layer1", "stem")


def _resnet_stages(body: nn.Module, strides: tuple[int, ...]) -> tuple[dict[str, str], list[int]]:
    # layer1 has stride 4, each next layer doubles it; C_k channels follow from layer4's width
    # (512 for the basic block, 2048 for the bottleneck), the rule torchvision's extractor uses
    layer_of = {4: 1, 8: 2, 16: 3, 32: 4}
    c5 = body.inplanes  # type: ignore[attr-defined]
    layers = [layer_of[s] for s in strides]
    return {f"layer{k}": str(i) for i, k in enumerate(layers)}, [c5 // 2 ** (4 - k) for k in layers]


def _tiny_stages(body: TinyBody, strides: tuple[int, ...]) -> tuple[dict[str, str], list[int]]:
    layer_of = {4: 1, 8: 2, 16: 3, 32: 4}
    return {f"layer{layer_of[s]}": str(i) for i, s in enumerate(strides)}, [body.stage_channels[s] for s in strides]


def _mobilenet_stage_ends(features: nn.Sequential) -> dict[int, int]:
    """For each output stride, the index of the LAST block at that stride.

    torchvision's ``_mobilenet_extractor`` returns the block right after each downsampling (the first
    block of a stride); the last block of the stride has been through the whole stage, the way
    ResNet's C3-C5 are the outputs of layer2-layer4. At 8, 16, 32 that is blocks 6, 12 and 16 of
    MobileNetV3-Large (40, 112 and 960 channels).
    """
    ends: dict[int, int] = {}
    stride = 2  # the stem convolution (block 0) halves the resolution
    for i, block in enumerate(features):
        if i > 0 and getattr(block, "_is_cn", False):
            stride *= 2
        ends[stride] = i
    return ends


def _mobilenet_stages(features: nn.Sequential, strides: tuple[int, ...]) -> tuple[dict[str, str], list[int]]:
    ends = _mobilenet_stage_ends(features)
    idx = [ends[s] for s in strides]
    return {str(k): str(i) for i, k in enumerate(idx)}, [features[k].out_channels for k in idx]


def freeze_layers(net: nn.Module, family: str, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` stages, the rule of torchvision's extractors.

    ResNet: 0-5 of (layer4, layer3, layer2, layer1, conv1+bn1); tiny: the same with its stem. MobileNet:
    0-6 stages, counted from the end, a stage starting at each downsampling block (and the stem at block 0).
    """
    if family in ("resnet", "tiny"):
        if not 0 <= trainable_layers <= 5:
            what = "a ResNet" if family == "resnet" else "the tiny body"
            raise ValueError(f"model.trainable_backbone_layers must be in [0, 5] for {what}, got {trainable_layers}")
        stages = RESNET_TRAINABLE if family == "resnet" else TINY_TRAINABLE
        keep = list(stages[:trainable_layers]) + (["bn1"] if family == "resnet" and trainable_layers == 5 else [])
        for name, p in net.named_parameters():
            if not any(name.startswith(k) for k in keep):
                p.requires_grad_(False)
        return
    features: nn.Sequential = net.features  # type: ignore[assignment]
    starts = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    if not 0 <= trainable_layers <= len(starts):
        raise ValueError(
            f"model.trainable_backbone_layers must be in [0, {len(starts)}] for MobileNet, "
            f"got {trainable_layers}"
        )
    first_trained = len(features) if trainable_layers == 0 else starts[len(starts) - trainable_layers]
    for block in features[:first_trained]:
        block.requires_grad_(False)


def _max_trainable(family: str) -> int:
    return 6 if family == "mobilenet" else 5


def resolve_weights(name: str, backbone: str) -> torchvision.models.WeightsEnum:
    """A torchvision weights enum from its name, checked against the backbone it is meant for."""
    if BACKBONES[backbone].family == "tiny":
        raise ValueError(f"model.backbone_weights={name!r}: model.backbone=tiny has no torchvision weights")
    try:
        weights = torchvision.models.get_weight(name)
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"model.backbone_weights={name!r} is neither an existing file nor a torchvision weights name "
            f"such as 'ResNet50_Weights.IMAGENET1K_V1' ({exc})"
        ) from None
    allowed = torchvision.models.get_model_weights(backbone)
    if not isinstance(weights, allowed):
        raise ValueError(
            f"model.backbone_weights={name!r} are weights of another network; {backbone} takes "
            f"{', '.join(f'{allowed.__name__}.{w.name}' for w in allowed)}"
        )
    return weights


def _state_dict_for_body(state: dict[str, torch.Tensor], spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """Accept the body's own state dict or the full classification network's (head dropped)."""
    out = {k: v for k, v in state.items() if not k.startswith(spec.head_prefixes)}
    if spec.family == "mobilenet":
        # the FPN body wraps ``features``, so a classifier checkpoint's "features.3.x" is "3.x" there
        out = {k.removeprefix("features."): v for k, v in out.items()}
    return out


def load_body_weights(body: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Load a local state dict into the FPN body; an error names the file and the mismatched keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted files raise anything from pickle errors to RuntimeError
        raise ValueError(f"model.backbone_weights: cannot read {path} as a state dict ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"model.backbone_weights: {path} holds a {type(state).__name__}, not a state dict")
    state = _state_dict_for_body(state, spec)
    expected = body.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked (and drops it itself): not a mismatch either way
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected and not k.endswith("num_batches_tracked")]
    wrong_shape = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        parts = [
            f"{what}: {show(keys)}"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shapes", wrong_shape),
            )
            if keys
        ]
        raise ValueError(
            f"model.backbone_weights: {path} does not fit this backbone's body ({'; '.join(parts)})"
        )
    body.load_state_dict(state, strict=False)


def _extra_block(kind: str, c5_channels: int, fpn_channels: int) -> ExtraFPNBlock:
    if kind == "maxpool":
        return LastLevelMaxPool()
    block = LastLevelP6P7(c5_channels if kind == "p6p7_from_c5" else fpn_channels, fpn_channels)
    # torchvision switches to P5 whenever the channel counts happen to agree (resnet18/34 with a
    # 512-channel FPN); the source is a design choice, so set it explicitly
    block.use_P5 = kind == "p6p7_from_p5"
    return block


def build_backbone(cfg: ModelSection, pyramid: str = "p3p7") -> BackboneWithFPN:
    """``cfg.backbone`` with an FPN of ``cfg.fpn_channels`` channels giving ``PYRAMIDS[pyramid]``'s levels."""
    spec = BACKBONES[cfg.backbone]
    pyr = PYRAMIDS[pyramid]
    weights_path: Path | None = None
    enum_weights = None
    # model.weights replaces every backbone tensor after the build: loading (or downloading) these first is waste
    if cfg.backbone_weights is not None and cfg.weights is None:
        candidate = Path(cfg.backbone_weights).expanduser()
        if candidate.is_file():
            weights_path = candidate
        elif candidate.suffix in {".pth", ".pt", ".bin"} or "/" in cfg.backbone_weights:
            raise ValueError(f"model.backbone_weights: no such file {candidate}")
        else:
            enum_weights = resolve_weights(cfg.backbone_weights, cfg.backbone)
    pretrained = cfg.backbone_weights is not None or cfg.weights is not None
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = spec.constructor(weights=enum_weights, norm_layer=norm_layer)
    trainable = cfg.trainable_backbone_layers if pretrained else _max_trainable(spec.family)
    freeze_layers(net, spec.family, trainable)

    body_source: nn.Module = net
    if spec.family == "resnet":
        return_layers, in_channels = _resnet_stages(net, pyr.strides)
    elif spec.family == "tiny":
        return_layers, in_channels = _tiny_stages(net, pyr.strides)  # type: ignore[arg-type]
    else:
        return_layers, in_channels = _mobilenet_stages(net.features, pyr.strides)  # type: ignore[arg-type]
        body_source = net.features  # type: ignore[assignment]
    extra = _extra_block(pyr.extra, in_channels[-1], cfg.fpn_channels)
    backbone = BackboneWithFPN(body_source, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)
    if weights_path is not None:
        load_body_weights(backbone.body, weights_path, spec)
    return backbone


def level_names(pyramid: str) -> list[str]:
    return list(PYRAMIDS[pyramid].level_names)


__all__ = [
    "BACKBONES",
    "PYRAMIDS",
    "BackboneSpec",
    "PyramidSpec",
    "TinyBody",
    "build_backbone",
    "freeze_layers",
    "level_names",
    "load_body_weights",
    "resolve_weights",
]
