"""docs/custom-data.md followed as a new user would: its commands, on a few coco128 images in YOLO layout.

The commands are taken from the walkthrough (each must appear in it verbatim) and run in a fresh folder
with configs/custom_dataset.yaml copied there; only the model is shrunk and the run shortened.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml

from robustdet.cli import build_parser, main
from tests.conftest import COCO128, REPO, tiny_overrides

DOC = REPO / "docs" / "custom-data.md"

# the walkthrough's commands, in its order
COPY = "cp configs/custom_dataset.yaml my_dataset.yaml"
TRAIN = "robustdet train my_dataset.yaml --out runs/my_dataset"
EVAL = "robustdet eval runs/my_dataset/checkpoints/last.pt --out runs/my_dataset/eval.json"
REPORT = "robustdet report runs/my_dataset"
PREDICT = "robustdet predict runs/my_dataset/checkpoints/last.pt datasets/my_dataset/images/val/{image} --out preds/"
EXPORT = "robustdet export runs/my_dataset/checkpoints/last.pt --format onnx --out model.onnx"

# a model that trains a few iterations in seconds (the data are the template's own keys, untouched)
TINY = [o for o in tiny_overrides(Path("unused")) if not o.startswith(("data.", "train.max_iter"))] + [
    "train.max_iter=3",
    "eval.period=0",
    "data.num_workers=0",
    "data.augment.scale_range=null",
]


def _subcommands() -> set[str]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def _my_dataset(root: Path, n_train: int = 6, n_val: int = 3) -> list[str]:
    """A few coco128 images and their YOLO labels laid out as the walkthrough's datasets/my_dataset."""
    images = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[: n_train + n_val]
    for split, chosen in (("train", images[:n_train]), ("val", images[n_train:])):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in chosen:
            shutil.copy(image, root / "images" / split / image.name)
            label = COCO128 / "labels" / "train2017" / f"{image.stem}.txt"
            if label.exists():
                shutil.copy(label, root / "labels" / split / label.name)
    names = yaml.safe_load((COCO128 / "data.yaml").read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                    "names": names}))  # fmt: skip
    return [p.name for p in images[n_train:]]


def _run(command: str, extra: list[str] | None = None) -> int:
    argv = command.split()[1:]
    # overrides go right after the config / checkpoint (the CLI's KEY=VALUE position)
    return main([*argv[:2], *(extra or []), *argv[2:]])


@pytest.mark.skipif(not COCO128.is_dir(), reason="coco128 not found next to the repository")
def test_walkthrough_on_coco128(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    doc = DOC.read_text()
    predict = PREDICT.format(image="IMAGE.jpg")
    for command in (COPY, TRAIN, EVAL, REPORT, predict, EXPORT):
        assert command in doc, f"docs/custom-data.md no longer says {command!r}"
    assert "(needs the export extra)" in doc

    monkeypatch.chdir(tmp_path)
    val_images = _my_dataset(tmp_path / "datasets" / "my_dataset")
    shutil.copy(REPO / "configs" / "custom_dataset.yaml", tmp_path / "my_dataset.yaml")  # COPY

    assert _run(TRAIN, TINY) == 0
    run = tmp_path / "runs" / "my_dataset"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iter"] == 3 and 0.0 <= metrics["bbox"]["AP"] <= 100.0
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["data"]["train"]["path"] == "datasets/my_dataset/data.yaml"  # the template's own path

    capsys.readouterr()
    assert _run(EVAL) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    # the same checkpoint on the same val split: the numbers the run itself wrote at its end
    assert evaluated["bbox"] == pytest.approx(metrics["bbox"])
    assert "AP50" in capsys.readouterr().out

    assert _run(REPORT) == 0
    assert any((run / "report").glob("*.png"))

    assert _run(PREDICT.format(image=val_images[0])) == 0
    assert any((tmp_path / "preds").iterdir())

    if "export" not in _subcommands():
        pytest.skip("robustdet export is not there yet: the walkthrough ran up to its last step")
    pytest.importorskip("onnx")
    assert _run(EXPORT) == 0
    assert (tmp_path / "model.onnx").stat().st_size > 0
