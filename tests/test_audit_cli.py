"""``robustdet audit`` end to end on tiny synthetic data: the files and their exact columns, cleaned.json
loading in pycocotools, --weights, resuming and refusing an audit folder, bad inputs (exit 2, one line,
nothing written), and index.html in a real headless browser (docs/audit.md)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustdet.audit.folds import Predictions
from robustdet.audit.outputs import ANNOTATION_COLUMNS, IMAGE_COLUMNS, MISSING_COLUMNS, score_split
from robustdet.audit.page import write_page
from robustdet.audit.split import AuditSplit, load_split
from robustdet.cli import main
from robustdet.config import load_config
from robustdet.data import DetectionDataset
from tests.conftest import REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")
NOISE = ["data.train.label_noise.class_flip=0.3", "data.train.label_noise.spurious=0.2", "data.synthetic.num_train=12"]
OUTPUTS = {"annotations.csv", "missing.csv", "images.csv", "cleaned.json", "index.html", "audit.json"}


def _overrides(cache: Path) -> list[str]:
    return [*tiny_overrides(cache, {"train.max_iter": 3, "checkpoint.period": None, "eval.period": None}), *NOISE]


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("audit")
    overrides = _overrides(base)
    out = base / "out"
    rc = main(["audit", CONFIG, *overrides, "--out", str(out), "--folds", "2"])
    return {"rc": rc, "out": out, "base": base, "overrides": overrides}


def test_the_audit_writes_every_file_with_its_exact_columns(audited: dict) -> None:
    out = audited["out"]
    assert audited["rc"] == 0
    assert {p.name for p in out.iterdir()} >= OUTPUTS
    assert {"fold_0", "fold_1"} <= {p.name for p in out.iterdir()}
    split = load_split(load_config(CONFIG, audited["overrides"]))
    columns, rows = _rows(out / "annotations.csv")
    assert tuple(columns) == ANNOTATION_COLUMNS
    # one row for every annotation of the noisy split, the spurious boxes the noise added included
    assert sorted(int(r["annotation_id"]) for r in rows) == sorted(a["id"] for a in split.coco["annotations"])
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    assert {r["issue"] for r in rows} <= {"ok", "class", "box", "spurious"}
    for r in rows:
        if r["suggested_bbox"]:
            assert len(json.loads(r["suggested_bbox"])) == 4
    assert tuple(_rows(out / "missing.csv")[0]) == MISSING_COLUMNS
    columns, images = _rows(out / "images.csv")
    assert tuple(columns) == IMAGE_COLUMNS and len(images) == len(split.dataset)
    assert (out / "label_noise.json").is_file()  # the corrupted ids, to measure the audit against


def test_cleaned_json_loads_in_pycocotools_with_the_fixes_applied(audited: dict) -> None:
    from pycocotools.coco import COCO

    out = audited["out"]
    coco = COCO(str(out / "cleaned.json"))
    _, rows = _rows(out / "annotations.csv")
    dropped = {int(r["annotation_id"]) for r in rows if r["issue"] == "spurious"}
    relabelled = {int(r["annotation_id"]): int(r["suggested_category_id"]) for r in rows
                  if r["issue"] == "class" and r["suggested_category_id"]}  # fmt: skip
    kept = {a["id"]: a for a in coco.dataset["annotations"]}
    assert not dropped & set(kept)
    assert all(kept[i]["category_id"] == c for i, c in relabelled.items() if i in kept)
    original = {int(r["annotation_id"]) for r in rows}
    _, missing = _rows(out / "missing.csv")
    added = [a for i, a in kept.items() if i not in original]
    assert len(added) == sum(float(m["score"]) >= 0.5 for m in missing)
    assert len(coco.dataset["images"]) == len(_rows(out / "images.csv")[1])


def test_a_rerun_refuses_then_overwrite_reuses_the_folds(audited: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = audited["out"]
    before = (out / "annotations.csv").read_text()
    capsys.readouterr()
    assert main(["audit", CONFIG, *audited["overrides"], "--out", str(out), "--folds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finished audit" in err and str(out) in err
    assert (out / "annotations.csv").read_text() == before  # nothing lost
    stamp = (out / "fold_0" / "predictions.npz").stat().st_mtime_ns
    assert main(["audit", CONFIG, *audited["overrides"], "--out", str(out), "--folds", "2", "--overwrite"]) == 0
    assert (out / "fold_0" / "predictions.npz").stat().st_mtime_ns == stamp  # same config: not retrained
    assert (out / "annotations.csv").read_text() == before


def test_an_unfinished_audit_resumes_where_it_stopped(audited: dict) -> None:
    out = audited["base"] / "resumed"
    shutil.copytree(audited["out"], out)
    manifest = json.loads((out / "audit.json").read_text())
    (out / "audit.json").write_text(json.dumps({**manifest, "finished": False}))
    (out / "fold_1" / "predictions.npz").unlink()  # stopped after fold 1's training, before its predictions
    (out / "annotations.csv").unlink()
    stamp = (out / "fold_0" / "predictions.npz").stat().st_mtime_ns
    assert main(["audit", CONFIG, *audited["overrides"], "--out", str(out), "--folds", "2"]) == 0
    assert (out / "fold_0" / "predictions.npz").stat().st_mtime_ns == stamp
    assert (out / "annotations.csv").read_text() == (audited["out"] / "annotations.csv").read_text()


def test_an_audit_from_before_a_switched_off_default_changed_is_scored_again_without_training(audited: dict) -> None:
    """loss.box_uncertainty_form's default changed (kl -> isolated) after audits had been run; with
    model.box_uncertainty off it changes no detection, so --overwrite keeps the folds (found rescoring the
    drop40 audits of stop 24 at another --threshold)."""
    out = audited["base"] / "old_default"
    shutil.copytree(audited["out"], out)
    manifest = json.loads((out / "audit.json").read_text())
    manifest["fingerprint"]["config"]["loss"]["box_uncertainty_form"] = "kl"
    (out / "audit.json").write_text(json.dumps(manifest))
    stamp = (out / "fold_0" / "predictions.npz").stat().st_mtime_ns
    argv = ["audit", CONFIG, *audited["overrides"], "--out", str(out), "--folds", "2", "--overwrite"]
    assert main([*argv, "--threshold", "0.9"]) == 0
    assert (out / "fold_0" / "predictions.npz").stat().st_mtime_ns == stamp  # not trained again
    assert json.loads((out / "audit.json").read_text())["threshold"] == 0.9


def test_another_audits_folder_or_a_foreign_one_is_refused(audited: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = audited["base"] / "other"
    shutil.copytree(audited["out"], out)
    manifest = json.loads((out / "audit.json").read_text())
    (out / "audit.json").write_text(json.dumps({**manifest, "finished": False}))
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["audit", CONFIG, *audited["overrides"], "train.max_iter=4", "--out", str(out)]) == 2
    assert "unfinished audit of another config" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    foreign = audited["base"] / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["audit", CONFIG, *audited["overrides"], "--out", str(foreign), "--overwrite"]) == 2
    assert "not an audit folder" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_weights_scores_with_one_model_and_trains_nothing(audited: dict) -> None:
    out = audited["base"] / "weights"
    ckpt = audited["out"] / "fold_0" / "checkpoints" / "last.pt"
    assert main(["audit", CONFIG, *audited["overrides"], "--out", str(out), "--weights", str(ckpt)]) == 0
    assert {p.name for p in out.iterdir()} >= OUTPUTS | {"predictions.npz"} and not list(out.glob("fold_*"))
    _, rows = _rows(out / "annotations.csv")
    assert len(rows) == len(_rows(audited["out"] / "annotations.csv")[1])


def _coco_case(tmp: Path, images: int = 3, annotations: bool = True, garbage: bool = False) -> Path:
    """A small COCO dataset in ``tmp``: 32 px images, one box each (or none); the last image undecodable."""
    entries, anns = [], []
    for i in range(images):
        path = tmp / f"{i}.png"
        if garbage and i == images - 1:
            path.write_bytes(b"not an image at all" * 10)
        else:
            Image.new("RGB", (32, 32), (i * 40, 90, 200)).save(path)
        entries.append({"id": i + 1, "file_name": path.name, "width": 32, "height": 32})
        if annotations:
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100,
                         "iscrowd": 0})  # fmt: skip
    path = tmp / "data.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return path


def _coco_argv(json_path: Path) -> list[str]:
    return [f"data.train={{format: coco, path: '{json_path}'}}", f"data.val={{format: coco, path: '{json_path}'}}"]


BAD = [
    ("missing json", lambda t: _coco_argv(t / "nope.json"), "nope.json"),
    ("invalid json", lambda t: (t / "bad.json").write_text("{not json") and _coco_argv(t / "bad.json"), "bad.json"),
    ("unreadable image", lambda t: _coco_argv(_coco_case(t, garbage=True)), "2.png"),
    ("no annotations", lambda t: _coco_argv(_coco_case(t, annotations=False)), "no annotations"),
    ("one fold", lambda t: [*_coco_argv(_coco_case(t)), "--folds", "1"], "--folds 1"),
    ("more folds than images", lambda t: [*_coco_argv(_coco_case(t)), "--folds", "4"], "--folds 4"),
    ("unknown fix", lambda t: [*_coco_argv(_coco_case(t)), "--fix", "relabel,rebox"], "--fix relabel,rebox"),
]


@pytest.mark.parametrize(("build", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         build, fragment: str) -> None:  # fmt: skip
    argv = build(tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["audit", CONFIG, *tiny_overrides(tmp_path, {"data.synthetic.cache_dir": None}), *argv,
                 "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("robustdet audit: error: ") and fragment in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_coco_source_is_cleaned_from_its_own_json(tmp_path: Path) -> None:
    source = _coco_case(tmp_path, images=4)
    data = json.loads(source.read_text())
    data["info"] = {"description": "mine"}
    for ann in data["annotations"]:
        ann["note"] = f"kept {ann['id']}"
    source.write_text(json.dumps(data))
    out = tmp_path / "out"
    argv = [*tiny_overrides(tmp_path, {"train.max_iter": 2, "checkpoint.period": None}), *_coco_argv(source)]
    assert main(["audit", CONFIG, *argv, "--out", str(out), "--fix", "none"]) == 0
    # no fix: the source json itself, its own keys included
    assert json.loads((out / "cleaned.json").read_text()) == data
    assert json.loads((out / "audit.json").read_text())["image_root"] == str(tmp_path)


# ------------------------------------------------------------------------------------------ the page
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: Path, fragment: str = "") -> str:
    """The page's DOM after its scripts ran, in Debian's headless chromium."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    done = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri() + fragment], capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    return done.stdout


def shown(dom: str) -> int:
    assert 'data-ready="1"' in dom, "the page's script did not finish"
    errors = re.search(r'<pre id="errors">(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors and errors.group(1)
    return int(re.search(r'<span id="shown-count">(\d+)</span>', dom).group(1))


def _known_case(tmp: Path) -> Path:
    """A page of known suspects (the hand-made case of tests/test_audit_scores.py): one class, one box and
    one spurious annotation and one missing object on image 1; image 2 has nothing to show."""
    entries = []
    for i in (1, 2):
        Image.new("RGB", (100, 100), (30 * i, 120, 60)).save(tmp / f"{i}.png")
        entries.append({"id": i, "file_name": f"{i}.png", "width": 100, "height": 100})
    boxes = [(1, 11, [10, 10, 30, 30], 1), (1, 12, [50, 50, 40, 40], 2), (1, 13, [10, 60, 20, 20], 3),
             (1, 14, [60, 5, 20, 20], 1), (2, 21, [5, 5, 20, 20], 2)]  # fmt: skip
    anns = [{"id": a, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, a, b, c in boxes]  # fmt: skip
    coco = {"images": entries, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    dets = [(0, [11, 10, 40, 41], 0.9, 0), (0, [50, 50, 90, 90], 0.8, 0), (0, [20, 66, 40, 86], 0.7, 2),
            (0, [40, 40, 50, 50], 0.6, 1), (1, [5, 5, 25, 26], 0.95, 1)]  # fmt: skip
    preds = Predictions(
        np.array([d[0] for d in dets]), np.array([d[1] for d in dets], float), np.array([d[2] for d in dets]),
        np.array([d[3] for d in dets]), None, np.zeros(0, np.int64), np.zeros(0),
    )
    split = AuditSplit(DetectionDataset(coco, tmp), coco, "known")
    return write_page(score_split(split, preds, 0.5), tmp)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_page_renders_without_errors_and_its_filters_change_the_count(tmp_path: Path) -> None:
    page = _known_case(tmp_path)
    assert shown(dump_dom(page)) == 4
    # either filter alone leaves 2 (the spurious box and the missing object; the class c2 suspects: the
    # swapped box and the missing object): 1 only when both apply
    assert shown(dump_dom(page, "#issue=spurious,missing&class=2")) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_audit_page_shows_every_suspect_of_the_csv_files(audited: dict) -> None:
    out = audited["out"]
    _, rows = _rows(out / "annotations.csv")
    _, missing = _rows(out / "missing.csv")
    expected = sum(r["issue"] != "ok" for r in rows) + sum(float(m["score"]) >= 0.5 for m in missing)
    assert shown(dump_dom(out / "index.html")) == expected
