"""predict and eval outputs (folders, globs, COCO results, class filter, other datasets) and the report's
PR curves, confusion matrix and AP-vs-iteration plot."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from robustdet.cli import main
from robustdet.data import coco_api
from robustdet.plots.detection_plots import coco_precision, confusion_matrix, pr_curves
from tests.conftest import COCO128, REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two iterations, evaluated after each; score_thresh 0 so that the untrained model detects something."""
    tmp = tmp_path_factory.mktemp("outputs")
    out = tmp / "run"
    extra = {"train.max_iter": 2, "checkpoint.period": 0, "eval.period": 1, "model.score_thresh": 0.0,
             "weighting.name": "equal", "loss.bayesian": "false"}
    assert main(["train", CONFIG, *tiny_overrides(tmp, extra), "--out", str(out)]) == 0
    cache = next((tmp / "cache").glob("synthetic-*"))
    return out, cache


def _load_res(gt_path, results):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        return gt, gt.loadRes(results)


def test_predict_folder_keeps_the_tree_and_writes_coco_results(run, tmp_path):
    out, cache = run
    ckpt = str(out / "checkpoints" / "last.pt")
    val = sorted((cache / "images" / "val").glob("*.png"))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    shutil.copy(val[0], tmp_path / "imgs" / "a" / val[0].name)
    shutil.copy(val[1], tmp_path / "imgs" / "b" / val[0].name)  # same name, another image
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    pred = tmp_path / "pred"
    argv = ["predict", ckpt, str(tmp_path / "imgs"), "--out", str(pred), "--score-thresh", "0", "--batch", "2",
            "--save-json", "--image-ids", str(cache / "val.json")]
    assert main(argv) == 0
    assert sorted(p.relative_to(pred).as_posix() for p in pred.rglob("*.png")) == [f"a/{val[0].stem}.png",
                                                                                   f"b/{val[0].stem}.png"]
    results = json.loads((pred / "detections.json").read_text())
    assert results and {r["file_name"] for r in results} == {f"a/{val[0].name}", f"b/{val[0].name}"}
    # both copies are named like val[0], whose id --image-ids gives them
    assert {r["image_id"] for r in results} == {int(val[0].stem) + 1}
    gt, dt = _load_res(cache / "val.json", results)
    assert len(dt.getAnnIds()) == len(results)
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    for r in results:
        assert len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0
    # the same as `eval` on that image: batch 2 gives what batch 1 gives
    argv1 = ["predict", ckpt, str(tmp_path / "imgs" / "a"), "--out", str(tmp_path / "p1"), "--score-thresh", "0",
             "--save-json", "--image-ids", str(cache / "val.json")]
    assert main(argv1) == 0
    one = json.loads((tmp_path / "p1" / "detections.json").read_text())
    mine = [r for r in results if r["file_name"].startswith("a/")]
    assert [r["category_id"] for r in one] == [r["category_id"] for r in mine]
    np.testing.assert_allclose([r["bbox"] for r in one], [r["bbox"] for r in mine], atol=1e-2)


def test_predict_globs_and_class_filter(run, tmp_path, capsys):
    out, cache = run
    ckpt = str(out / "checkpoints" / "last.pt")
    val_dir = cache / "images" / "val"
    pred = tmp_path / "pred"
    assert main(["predict", ckpt, str(val_dir / "00000[0-2].png"), "--out", str(pred), "--score-thresh", "0",
                 "--save-json", "--classes", "ellipse,4"]) == 0
    assert sorted(p.name for p in pred.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    results = json.loads((pred / "detections.json").read_text())
    # ellipse is category 2 of the synthetic shapes; 4 the id of "ring"
    assert results and {r["category_id"] for r in results} <= {2, 4}
    preds = json.loads((pred / "predictions.json").read_text())
    assert {d["label"] for p in preds for d in p["detections"]} <= {"ellipse", "ring"}
    # a recursive glob; an unknown class is a one-line error
    assert main(["predict", ckpt, str(cache / "images" / "**" / "000005.png"), "--out", str(tmp_path / "g")]) == 0
    found = sorted(p.relative_to(tmp_path / "g").as_posix() for p in (tmp_path / "g").rglob("*.png"))
    assert found == ["train/000005.png", "val/000005.png"]  # both splits have a 000005.png
    capsys.readouterr()
    assert main(["predict", ckpt, str(val_dir), "--out", str(tmp_path / "x"), "--classes", "hexagon"]) == 2
    assert "'hexagon' is not a class name or category id" in capsys.readouterr().err
    assert main(["predict", ckpt, str(tmp_path / "none*.jpg"), "--out", str(tmp_path / "x")]) == 2
    assert "matches no image files" in capsys.readouterr().err


@pytest.mark.skipif(not COCO128.exists(), reason="coco128 not available")
def test_predict_coco_file_names_give_coco_image_ids(run, tmp_path):
    out, _ = run
    images = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[:2]
    pred = tmp_path / "pred"
    assert main(["predict", str(out / "checkpoints" / "last.pt"), *map(str, images), "--out", str(pred),
                 "--score-thresh", "0", "--save-json", "--batch", "2"]) == 0
    results = json.loads((pred / "detections.json").read_text())
    # the synthetic model's category ids 1-5 exist in COCO too: loadRes accepts the file as is
    _, dt = _load_res(COCO128 / "annotations" / "instances_train2017.json", results)
    assert {a["image_id"] for a in dt.anns.values()} == {int(p.stem) for p in images}


def test_eval_table_saved_detections_and_another_dataset(run, tmp_path, capsys):
    out, cache = run
    ckpt = str(out / "checkpoints" / "last.pt")
    det = tmp_path / "detections.json"
    capsys.readouterr()
    assert main(["eval", ckpt, "--save-json", str(det), "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    for name, ap in metrics["per_class"].items():
        assert any(line.split()[0] == name and line.split()[-1] == f"{ap:.1f}" for line in printed.splitlines())
    # the saved results, evaluated by pycocotools on their own, give the printed AP
    results = json.loads(det.read_text())
    gt, dt = _load_res(cache / "val.json", results)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert max(ev.stats[0], 0) * 100 == pytest.approx(metrics["bbox"]["AP"], abs=1e-9)
    # the same images as a COCO json: through --data and through positional overrides, the same numbers
    coco = ["--data", "val.format=coco", "--data", f"val.path={cache / 'val.json'}",
            "--data", f"val.image_root={cache / 'images' / 'val'}"]
    assert main(["eval", ckpt, *coco, "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["bbox"] == metrics["bbox"]
    pos = [f"data.val={{format: coco, path: {cache / 'val.json'}, image_root: {cache / 'images' / 'val'}}}"]
    assert main(["eval", ckpt, *pos, "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["bbox"] == metrics["bbox"]
    capsys.readouterr()
    assert main(["eval", ckpt, "--data", "val.format=coco", "--data", "val.path=missing.json"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_save_json_is_one_flag_for_eval_and_predict(run, tmp_path, capsys, monkeypatch):
    """``--save-json`` writes detections.json into ``--out DIR`` for eval as for predict; eval's old
    ``--save-json FILE`` still works, with a one-line deprecation notice; an override right after the flag
    stays an override."""
    out, cache = run
    ckpt = str(out / "checkpoints" / "last.pt")
    monkeypatch.chdir(tmp_path)  # where a mistaken relative FILE would land
    capsys.readouterr()
    assert main(["eval", ckpt, "--save-json", "--out", str(tmp_path / "e")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    new = json.loads((tmp_path / "e" / "detections.json").read_text())
    assert new and json.loads((tmp_path / "e" / "metrics.json").read_text())["iter"] == 2
    # the old form: the same results where it says, and one notice
    old = tmp_path / "old" / "det.json"
    assert main(["eval", ckpt, "--save-json", str(old)]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert notices == [f"robustdet eval: warning: --save-json {old} is deprecated; use --save-json with --out DIR, "
                       "which writes DIR/detections.json"]
    assert json.loads(old.read_text()) == new
    # --out FILE.json stays the metrics file; the flag puts detections.json beside it
    assert main(["eval", ckpt, "--out", str(tmp_path / "m.json"), "--save-json"]) == 0
    assert json.loads((tmp_path / "detections.json").read_text()) == new
    assert json.loads((tmp_path / "m.json").read_text())["iter"] == 2
    # an override after the flag is an override (one image evaluated), not a file name
    assert main(["eval", ckpt, "--save-json", "eval.max_images=1", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "detections.json").read_text())
    assert len({r["image_id"] for r in one}) == 1 < len({r["image_id"] for r in new})
    assert not (tmp_path / "eval.max_images=1").exists()
    capsys.readouterr()
    assert main(["eval", ckpt, "--save-json"]) == 2
    assert "eval --save-json: needs --out DIR" in capsys.readouterr().err
    # predict: the same flag, the same place
    image = sorted((cache / "images" / "val").glob("*.png"))[0]
    argv = ["predict", ckpt, str(image), "--out", str(tmp_path / "p"), "--score-thresh", "0", "--save-json"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "p" / "detections.json").read_text())


def test_report_writes_pr_curves_confusion_matrix_and_ap_plot(run):
    out, cache = run
    assert main(["report", str(out)]) == 0
    for name in ("pr_curves_iou50.png", "pr_curves_iou50-95.png", "confusion_matrix.png", "ap_vs_iteration.png"):
        assert (out / "report" / name).stat().st_size > 0, name
    # the curves' means are COCO's per-class AP (area all, maxDets 100) of the final evaluation
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(cache / "val.json"))
    precision, cats = coco_precision(gt, json.loads((out / "detections.json").read_text()), gt.getImgIds())
    per_class = json.loads((out / "metrics.json").read_text())["per_class"]
    curves = pr_curves(precision, "50:95")
    for k, cat in enumerate(cats):
        if not np.isnan(curves[k]).all():
            assert np.mean(curves[k]) * 100 == pytest.approx(per_class[gt.cats[cat]["name"]], abs=1e-9)


def test_confusion_matrix_counts_on_a_hand_made_case():
    box = {"width": 100, "height": 100}
    gt = coco_api({
        "images": [{"id": 1, "file_name": "1.jpg", **box}, {"id": 2, "file_name": "2.jpg", **box}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [40, 40, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [80, 80, 10, 10], "area": 100, "iscrowd": 1},
        ],
    })
    results = [
        # image 1: the cat found (IoU 1); the dog called a cat (IoU 0.81); a cat where nothing is
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [51, 51, 18, 18], "score": 0.8},
        {"image_id": 1, "category_id": 7, "bbox": [20, 20, 10, 10], "score": 0.7},
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.1},  # below the threshold
        # image 2: the dog found twice (the lower score is a false positive); IoU 0.48 with the cat is a miss
        # and a false positive; a dog on the crowd box is a false positive (crowd boxes are left out)
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.95},
        {"image_id": 2, "category_id": 7, "bbox": [1, 0, 10, 10], "score": 0.6},
        {"image_id": 2, "category_id": 3, "bbox": [43.5, 40, 10, 10], "score": 0.5},
        {"image_id": 2, "category_id": 7, "bbox": [80, 80, 10, 10], "score": 0.4},
        {"image_id": 3, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.9},  # not an evaluated image
    ]
    counts = confusion_matrix(gt, results, [3, 7], [1, 2], score_thresh=0.25)
    # rows: true cat, dog, background; columns: predicted cat, dog, background
    expected = np.array([[1, 0, 1],
                         [1, 1, 0],
                         [1, 3, 0]])
    np.testing.assert_array_equal(counts, expected)
    # at IoU 0.45 the shifted cat (IoU 0.4815) is found instead
    counts = confusion_matrix(gt, results, [3, 7], [1, 2], score_thresh=0.25, iou_thresh=0.45)
    np.testing.assert_array_equal(counts, [[2, 0, 0], [1, 1, 0], [0, 3, 0]])
