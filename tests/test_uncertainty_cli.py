"""Per-box σ through the CLI on tiny data: train with ``model.box_uncertainty``, then the final
``detections.json``, ``eval --save-json`` (with and without ``model.var_voting``), ``predict --save-json``
and ``export`` (onnxruntime, 4 outputs) all carry ``bbox_std``; and the config error of voting without σ."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustdet.cli import main
from robustdet.engine.inference import load_trained
from tests.conftest import REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")
DETECTORS = {
    "retinanet": {},
    "fcos": {"model.anchor_sizes": None, "loss.box_loss": "smooth_l1"},
    "faster_rcnn": {"model.head_norm": "none", "model.anchor_scales": "[1.0]", "loss.box_loss": "smooth_l1"},
}


@pytest.fixture(scope="module", params=list(DETECTORS))
def run(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(f"sigma-{name}")
    extra = {"model.name": name, **DETECTORS[name], "model.box_uncertainty": "true", "train.max_iter": 2,
             "checkpoint.period": 0, "model.score_thresh": 0.0, "weighting.name": "equal",
             "loss.bayesian": "false"}
    out = tmp / "run"
    assert main(["train", CONFIG, *tiny_overrides(tmp, extra), "--out", str(out)]) == 0
    assert "bbox_std" in json.loads((out / "detections.json").read_text())[0]
    return name, out, next((tmp / "cache").glob("synthetic-*"))


def _sigmas(records: list[dict]) -> np.ndarray:
    assert records and all(len(r["bbox_std"]) == 4 for r in records)
    sigma = np.asarray([r["bbox_std"] for r in records])
    assert (sigma > 0).all() and np.isfinite(sigma).all()
    return sigma


def test_final_detections_and_eval_json_carry_bbox_std(run, tmp_path):
    name, out, _ = run
    final = json.loads((out / "detections.json").read_text())
    _sigmas(final)
    ckpt = str(out / "checkpoints" / "last.pt")
    plain, voted = tmp_path / "plain.json", tmp_path / "voted.json"
    assert main(["eval", ckpt, "--save-json", str(plain)]) == 0
    assert main(["eval", ckpt, "model.var_voting=true", "--save-json", str(voted)]) == 0
    a, b = json.loads(plain.read_text()), json.loads(voted.read_text())
    # the same detections and σ; voting moves boxes, never scores
    assert [r["score"] for r in a] == [r["score"] for r in b]
    np.testing.assert_array_equal(_sigmas(a), _sigmas(b))
    moved = np.abs(np.asarray([r["bbox"] for r in a]) - np.asarray([r["bbox"] for r in b])).max()
    # an FCOS two iterations old predicts points (its ReLU'd distances are 0), which overlap nothing
    assert moved > 1e-3 or name == "fcos"


def test_predict_json_and_drawing(run, tmp_path):
    _, out, cache = run
    images = sorted((cache / "images" / "val").glob("*.png"))[:2]
    pred = tmp_path / "pred"
    argv = ["predict", str(out / "checkpoints" / "last.pt"), *map(str, images), "--out", str(pred),
            "--score-thresh", "0", "--save-json", "--image-ids", str(cache / "val.json")]
    assert main(argv) == 0
    _sigmas(json.loads((pred / "detections.json").read_text()))
    records = json.loads((pred / "predictions.json").read_text())
    assert all(len(d["std_xyxy"]) == 4 for r in records for d in r["detections"])
    assert len(list(pred.glob("*.png"))) == 2


def test_export_onnx_has_bbox_std(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, out, _ = run
    ckpt = out / "checkpoints" / "last.pt"
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "model.var_voting=true", "--format", "onnx", "--out", str(onnx_path),
                 "--size", "64", "64"]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels", "bbox_std"]
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes, scores, _labels, std = session.run(None, {"image": image.numpy()})
    loaded = load_trained(ckpt, ["model.var_voting=true"])
    with torch.no_grad():
        ref = loaded.model([image])[0]
    assert std.shape == boxes.shape and len(scores) > 0
    # the top detection (scores of an untrained model tie below it) in both
    i, j = int(ref["scores"].argmax()), int(np.argmax(scores))
    np.testing.assert_allclose(boxes[j], ref["boxes"][i].numpy(), atol=1e-2)
    np.testing.assert_allclose(std[j], ref["bbox_std"][i].numpy(), rtol=1e-4, atol=1e-4)


def test_var_voting_without_box_uncertainty_is_one_line(tmp_path, capsys):
    argv = ["train", CONFIG, *tiny_overrides(tmp_path, {"model.var_voting": "true"}), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.var_voting" in err[0] and "model.box_uncertainty" in err[0]
    assert not (tmp_path / "x").exists()
