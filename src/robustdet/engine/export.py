"""Export a trained detector's inference to ONNX or TorchScript (``robustdet export``, docs/export.md).

The exported program takes one image ``[3, H, W]``, float32 RGB in [0, 1] (what ``model(images)`` takes
in eval mode), and returns ``boxes`` [N, 4] float32 (XYXY, pixels of that image), ``scores`` [N] float32
and ``labels`` [N] int64 (0..C-1, the checkpoint's classes), as robustdet's eval mode does; a model with
``model.box_uncertainty`` also ``bbox_std`` [N, 4] float32 (σ of x1, y1, x2, y2 in pixels of the image). The model's
own pre-processing (normalisation by ``model.image_mean``/``image_std``, resizing to
``model.min_size``/``max_size``) and post-processing (score threshold, NMS, ``detections_per_img``,
rescaling to the input's pixels) are part of the graph.

Both formats are traced (``torch.jit.trace``; ONNX with the TorchScript-based exporter, ``dynamo=False``):
torch.export, behind the default dynamo exporter, stops at the data-dependent branch of torchvision's
``batched_nms`` (GuardOnDataDependentSymNode). The trace runs torchvision's own eval forward of the
detector class (RetinaNet, FCOS, GeneralizedRCNN), which robustdet's detectors inherit and override
only for their losses: torchvision writes it so that a trace keeps image sizes as tensors, whereas
robustdet's ``forward`` reads them as Python ints, which a trace freezes (at another input size its
boxes would be scaled for the traced size). tests/test_export.py checks the exported files against
``model(images)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from robustdet.engine.inference import load_trained
from robustdet.errors import ExportError

FORMATS = ("onnx", "torchscript")
# torchvision's detection models export from opset 11 on (its test_onnx.py); 17 is the newest opset the
# TorchScript-based exporter covers fully and onnxruntime >= 1.14 runs.
ONNX_OPSET = 17
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
STD_OUTPUT = "bbox_std"  # the fourth output of a model with model.box_uncertainty
# a seeded example image for the trace: its values only pick the branches torchvision takes under tracing
_EXAMPLE_SEED = 0


def _torchvision_detector(model: nn.Module) -> type[nn.Module]:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("torchvision.models.detection.") and "forward" in vars(cls):
            return cls
    raise ExportError(f"{type(model).__name__}: not a torchvision detection model, so there is no traceable forward")


class ExportableDetector(nn.Module):
    """One image [3, H, W] (float32, 0-1) -> (boxes [N, 4], scores [N], labels [N] in 0..C-1), and with
    ``with_std`` (``model.box_uncertainty``) a fourth output ``bbox_std`` [N, 4] (σ of x1, y1, x2, y2 in
    the input's pixels).

    Runs the torchvision eval forward of ``model``'s detector class (see the module docstring for why
    not ``model(images)``, which it equals: tests/test_export.py). A two-stage model with ``with_std`` runs
    torchvision's transform, backbone and RPN and robustdet's box-head detection (``_detect``) instead:
    torchvision's ``RoIHeads.forward`` takes two predictor outputs, the uncertain box head gives three.
    """

    def __init__(self, model: nn.Module, with_std: bool = False) -> None:
        super().__init__()
        self.model = model
        self.with_std = with_std
        # eval for good: torch.onnx.export restores the wrapper's mode, recursively, when it is done
        self.eval()
        self._forward = _torchvision_detector(model).forward
        self.two_stage = isinstance(model, GeneralizedRCNN)
        # two-stage torchvision detectors count background as class 0 (robustdet's Faster R-CNN shifts
        # its labels back in its own forward, which the trace does not run)
        self.label_offset = 1 if self.two_stage and not with_std else 0

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        det = self._two_stage(image) if self.two_stage and self.with_std else self._forward(self.model, [image])[0]
        out = (det["boxes"], det["scores"], det["labels"] - self.label_offset)
        return (*out, det["bbox_std"]) if self.with_std else out

    def _two_stage(self, image: Tensor) -> dict[str, Tensor]:
        """torchvision's ``GeneralizedRCNN.forward`` (eval) with robustdet's ``_detect`` for the box head;
        the sizes kept as traced values, as torchvision keeps them."""
        model = self.model
        size = image.shape[-2:]
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        detections = model._detect(features, proposals, images.image_sizes)
        return model.transform.postprocess(detections, images.image_sizes, [(size[0], size[1])])[0]


@torch.no_grad()
def set_up(model: nn.Module, min_size: int) -> None:
    """One eval call on a square image, so that what sets itself up on its first call does so alike in
    every export, and right.

    torchvision's ``MultiScaleRoIAlign`` (Faster R-CNN's RoI pooler) infers the scale of each feature map
    on its first call, as 2^round(log2(feature height / image height)) with the image's height before
    padding to a multiple of 32, and keeps it. Traced first on an image that padding grows by more than
    √2 (a landscape image resized to ``max_size`` 64 is 43 px high, padded to 64), it would bake 1/2
    instead of 1/4 into the exported graph. A square image is resized to ``min_size`` square, which
    padding grows by less than √2 when ``min_size`` is at least 76 or a multiple of 32.
    """
    model([example_image((min_size, min_size))])


def example_image(size: tuple[int, int]) -> Tensor:
    generator = torch.Generator().manual_seed(_EXAMPLE_SEED)
    return torch.rand(3, *size, generator=generator)


def export_model(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    dynamic: bool = False,
    size: tuple[int, int] | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Export ``checkpoint``'s detector (its config plus ``overrides``) to ``out``; returns ``out``.

    ``size`` (H, W) is the input size of a fixed-size export and the traced example's size of a dynamic
    one; it defaults to ``model.min_size`` square (which the model's resizing leaves as it is).
    ``dynamic`` makes the ONNX input's height and width symbolic; a TorchScript trace reads the image
    size at run time either way.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: not one of {', '.join(FORMATS)}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ExportError(f"--size {tuple(size)}: needs two positive integers H W")
    if fmt == "onnx":
        _require_onnx()
    loaded = load_trained(checkpoint, overrides)
    model = loaded.model.cpu().eval()
    min_size = loaded.cfg.model.min_size
    h, w = size or (min_size, min_size)
    set_up(model, min_size)
    wrapper = ExportableDetector(model, with_std := loaded.cfg.model.box_uncertainty)
    image = example_image((h, w))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # torchvision's detection code knowingly reads a few shapes as Python values under tracing
        # (constants that do not depend on the input size); its TracerWarnings are expected
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torchvision's transform rescales boxes with torch.tensor(size) on traced sizes, and the ONNX
        # exporter warns that advanced indexing with negative indices would be wrong: torchvision's
        # indices come from where/topk/nms, never negative (tests/test_export.py checks the outputs)
        warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator of advanced indexing", UserWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, (image,), check_trace=False)
            traced.save(str(out))
        else:
            n = {0: "num_detections"}
            names = [*OUTPUT_NAMES, STD_OUTPUT] if with_std else OUTPUT_NAMES
            axes: dict[str, dict[int, str]] = dict.fromkeys(names, n)
            if dynamic:
                axes["image"] = {1: "height", 2: "width"}
            torch.onnx.export(
                wrapper,
                (image,),
                str(out),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=INPUT_NAMES,
                output_names=names,
                dynamic_axes=axes,
            )
    return out


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("--format onnx needs the onnx package: pip install 'robustdet[export]'") from None


__all__ = ["FORMATS", "ONNX_OPSET", "STD_OUTPUT", "ExportableDetector", "example_image", "export_model", "set_up"]
