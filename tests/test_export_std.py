"""The exported ONNX (run by onnxruntime) and TorchScript programs of a model with per-box uncertainty give a
fourth output, ``bbox_std``, equal to eval mode's, with and without var voting, for all three detectors.

The heads here are stand-ins that add α = clamp(½·regression) (tests/test_box_std.py has the checks of
the values themselves); the CLI round trip with the real heads is in tests/test_uncertainty_cli.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from robustdet.config import config_from_dict
from robustdet.engine.export import STD_OUTPUT, ExportableDetector, set_up
from robustdet.models import build_model

NUM_CLASSES = 3
SIZE = (96, 128)  # H, W of the export and of the test image; resized to 48 x 64 by the model


class LogVarFromRegression(nn.Module):
    """A dense head plus ``bbox_log_var`` = clamp(½·bbox_regression, −7, 7): per anchor, traceable."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.box_coder = getattr(head, "box_coder", None)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        out = self.head(features)
        out["bbox_log_var"] = (0.5 * out["bbox_regression"]).clamp(-7.0, 7.0)
        return out


class PredictorLogVar(nn.Module):
    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, deltas = self.predictor(x)[:2]  # the real α head is replaced by one tied to the deltas
        return logits, deltas, (0.5 * deltas).clamp(-7.0, 7.0)


def model_with_std(name: str, var_voting: bool) -> nn.Module:
    section: dict[str, object] = {
        "name": name, "backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64,
        "score_thresh": 0.005, "box_uncertainty": True, "var_voting": var_voting,
    }
    if name != "fcos":
        section["anchor_sizes"] = [8, 16, 32, 64, 128]
    loss = {"box_loss": "smooth_l1"}
    torch.manual_seed(0)
    model = build_model(config_from_dict({"model": section, "loss": loss}), NUM_CLASSES).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if name == "faster_rcnn":
        model.roi_heads.box_predictor = PredictorLogVar(model.roi_heads.box_predictor)
    else:
        model.head = LogVarFromRegression(model.head)
    set_up(model, 64)
    return model


def export(model: nn.Module, fmt: str, path: Path) -> None:
    wrapper = ExportableDetector(model, with_std=True)
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.trace(wrapper, (image,), check_trace=False).save(str(path))
        else:
            names = ["boxes", "scores", "labels", STD_OUTPUT]
            torch.onnx.export(wrapper, (image,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                              output_names=names, dynamic_axes={key: {0: "n"} for key in names})


def run_exported(fmt: str, path: Path, image: Tensor) -> tuple[Tensor, ...]:
    if fmt == "torchscript":
        with torch.no_grad():
            return tuple(torch.jit.load(str(path))(image))
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return tuple(torch.from_numpy(x) for x in session.run(None, {"image": image.numpy()}))


# ONNX with variance voting is the same traced graph as TorchScript's, and goes end to end through
# `robustdet export` in tests/test_uncertainty_cli.py
@pytest.mark.parametrize(("fmt", "var_voting"), [("onnx", False), ("torchscript", False), ("torchscript", True)])
@pytest.mark.parametrize("name", ["retinanet", "fcos", "faster_rcnn"])
def test_exported_bbox_std_equals_eval_mode(tmp_path: Path, name: str, fmt: str, var_voting: bool) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    model = model_with_std(name, var_voting)
    path = tmp_path / f"{name}.{fmt}"
    export(model, fmt, path)
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model([image])[0]
    got = run_exported(fmt, path, image)
    assert len(got) == 4 and got[3].shape == got[0].shape and got[3].dtype == torch.float32
    assert len(ref["boxes"]) > 5
    # pair each eval-mode detection with the exported one of its label nearest in box (near-ties of a
    # random model may come out in another order from another runtime)
    box_diff = (ref["boxes"][:, None] - got[0][None]).abs().amax(dim=2)
    score_diff = (ref["scores"][:, None] - got[1][None]).abs()
    close = (ref["labels"][:, None] == got[2][None]) & (box_diff <= 1e-2) & (score_diff <= 1e-5)
    best, j = torch.where(close, box_diff + score_diff, torch.inf).min(dim=1)
    matched = best.isfinite()
    assert float(matched.float().mean()) >= 0.9
    torch.testing.assert_close(got[3][j[matched]], ref["bbox_std"][matched], rtol=1e-4, atol=1e-4)
