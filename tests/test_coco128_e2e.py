"""Real data end to end: train from coco128's train2017 COCO json, evaluate on val2017 converted from YOLO."""

import json

import pytest

from robustdet.cli import main
from tests.conftest import COCO128, REPO, tiny_overrides

pytestmark = [
    pytest.mark.coco128,
    pytest.mark.skipif(not COCO128.is_dir(), reason=f"{COCO128} is absent"),
]


def test_train_on_coco_json_and_evaluate_on_converted_yolo_val(tmp_path, capsys):
    val_json = tmp_path / "val2017.json"
    assert main(["convert", "--format", "yolo", "--path", str(COCO128 / "data.yaml"), "--split", "val",
                 "--out", str(val_json)]) == 0
    assert f"image_root: {COCO128}" in capsys.readouterr().out
    val = json.loads(val_json.read_text())
    assert len(val["images"]) == 128 and len(val["categories"]) == 80
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in val["annotations"])

    train = (f"{{format: coco, path: {COCO128 / 'annotations' / 'instances_train2017.json'}, "
             f"image_root: {COCO128 / 'images' / 'train2017'}}}")
    val_source = f"{{format: coco, path: {val_json}, image_root: {COCO128}}}"  # file_names: images/val2017/...
    run = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, {
        "data.train": train, "data.val": val_source, "model.min_size": 96, "model.max_size": 160,
        "model.anchor_sizes": "[16, 32, 64, 128, 256]", "train.max_iter": 3, "train.batch_size": 2,
        "eval.max_images": 6, "loss.bayesian": "true", "weighting.name": "rlo", "weighting.interval": 2,
    })
    assert main(["train", str(REPO / "configs" / "default.yaml"), *overrides, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 80
    assert "person" in metrics["per_class"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert all(all(map(lambda v: v == v, r["level_losses"])) for r in records)  # no NaN on real images

    # the same run also evaluates directly on the YOLO split: same 80 classes by name
    yolo_val = f"{{format: yolo, path: {COCO128 / 'data.yaml'}, split: val}}"
    out = tmp_path / "yolo_eval.json"
    assert main(["eval", str(run / "checkpoints" / "last.pt"), f"data.val={yolo_val}", "eval.max_images=6",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["bbox"] == metrics["bbox"]
