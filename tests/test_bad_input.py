"""A corpus of bad inputs, each run end to end through ``robustdet train`` (or ``eval``) in-process.

Every case must end with exit code 2, one error message naming the file, image or key (the fragment
below), no traceback, and, where the problem is knowable up front, before training starts (no
log.jsonl in the run directory). One case runs as a subprocess with ``--debug`` to show that the
traceback is still there when asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from robustdet.cli import main
from tests.conftest import REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")
SIZE = 64  # the tiny model's input size


# ------------------------------------------------------------------------------------------ datasets
def write_image(path: Path, size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> None:
    """A noisy RGB PNG (noise so that the file is large enough for a truncation to hit pixel data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def make_coco(root: Path, num_images: int = 3, name: str = "instances.json") -> Path:
    """A valid COCO dataset: ``root/images/img{i}.png`` (64x64) with two boxes each, two categories."""
    images, annotations = [], []
    for i in range(num_images):
        write_image(root / "images" / f"img{i}.png", seed=i)
        images.append({"id": i + 1, "file_name": f"img{i}.png", "width": SIZE, "height": SIZE})
        for k, box in enumerate(([4, 6, 20, 16], [30, 28, 24, 30])):
            annotations.append(
                {"id": 2 * i + k + 1, "image_id": i + 1, "category_id": 1 + k, "bbox": box, "iscrowd": 0}
            )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    path = root / name
    path.write_text(json.dumps(data))
    return path


def coco_overrides(json_path: Path, image_root: Path, val_json: Path | None = None) -> list[str]:
    val = val_json or json_path
    return [
        "data.train.format=coco", f"data.train.path={json_path}", f"data.train.image_root={image_root}",
        "data.val.format=coco", f"data.val.path={val}", f"data.val.image_root={image_root}",
    ]  # fmt: skip


def _train_argv(tmp: Path, extra: list[str], config: str = CONFIG) -> list[str]:
    return ["train", config, *tiny_overrides(tmp, {"log.tensorboard": "false"}), *extra, "--out", str(tmp / "run")]


# Each builder writes what it needs into tmp and returns the argv for main().
Builder = Callable[[Path], list[str]]


def coco_case(mutate: Callable[[dict[str, Any], Path], None], *extra: str) -> Builder:
    """A valid COCO dataset, then ``mutate(data, root)`` on its json dict (and files)."""

    def build(tmp: Path) -> list[str]:
        path = make_coco(tmp / "coco")
        data = json.loads(path.read_text())
        mutate(data, tmp / "coco")
        path.write_text(json.dumps(data))
        return _train_argv(tmp, [*coco_overrides(path, tmp / "coco" / "images"), *extra])

    return build


def coco_text_case(text: str | None) -> Builder:
    """A valid COCO dataset whose json is then replaced by ``text`` (None: removed)."""

    def build(tmp: Path) -> list[str]:
        path = make_coco(tmp / "coco")
        if text is None:
            path.unlink()
        else:
            path.write_text(text)
        return _train_argv(tmp, coco_overrides(path, tmp / "coco" / "images"))

    return build


def _set(dotted: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def mutate(data: dict[str, Any], root: Path) -> None:
        *parents, last = dotted.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _files(action: Callable[[Path], None]) -> Callable[[dict[str, Any], Path], None]:
    return lambda data, root: action(root)


def _symlink_out(data: dict[str, Any], root: Path) -> None:
    write_image(root.parent / "outside.png")
    os.symlink(root.parent / "outside.png", root / "images" / "link.png")
    data["images"][0]["file_name"] = "link.png"


def _animated(data: dict[str, Any], root: Path) -> None:
    frames = [Image.new("RGB", (SIZE, SIZE), (40 * k, 0, 0)) for k in range(3)]
    frames[0].save(root / "images" / "anim.gif", save_all=True, append_images=frames[1:])
    data["images"][1]["file_name"] = "anim.gif"


def _duplicate_image_id(data: dict[str, Any], root: Path) -> None:
    data["images"][1]["id"] = data["images"][0]["id"]


def make_yolo(root: Path, label: str = "0 0.5 0.5 0.25 0.25\n") -> Path:
    write_image(root / "images" / "train" / "a.png")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(label)
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/train", "names": ["x"]}))
    return data_yaml


def yolo_case(label: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        data_yaml = make_yolo(tmp / "yolo", label)
        return _train_argv(
            tmp,
            ["data.train.format=yolo", f"data.train.path={data_yaml}", "data.train.split=train",
             "data.val.format=yolo", f"data.val.path={data_yaml}", "data.val.split=val"],
        )  # fmt: skip

    return build


VOC_XML = """<annotation><size><width>64</width><height>64</height><depth>3</depth></size>
<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax></bndbox></object>
</annotation>"""

VOC_BOMB = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n' for i in range(1, 10)
    )
    + "]>\n<annotation><size><width>64</width><height>64</height></size><filename>&lol9;</filename></annotation>"
)


def voc_case(xml: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        root = tmp / "VOC2007"
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n")
        (root / "Annotations").mkdir()
        (root / "Annotations" / "000001.xml").write_text(xml)
        write_image(root / "JPEGImages" / "000001.jpg")
        return _train_argv(
            tmp,
            ["data.train.format=voc", f"data.train.path={root}", "data.train.split=train",
             "data.val.format=voc", f"data.val.path={root}", "data.val.split=train"],
        )  # fmt: skip

    return build


def config_case(*overrides: str) -> Builder:
    return lambda tmp: _train_argv(tmp, list(overrides))


def config_file_case(text: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        path = tmp / "bad.yaml"
        path.write_text(text)
        return _train_argv(tmp, [], config=str(path))

    return build


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo this would run on load",))


def _evil_checkpoint(tmp: Path) -> list[str]:
    path = tmp / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": _Payload()}, path)
    return ["eval", str(path)]


def _truncated_checkpoint(tmp: Path) -> list[str]:
    path = tmp / "cut.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, path)
    truncate(path)
    return ["eval", str(path)]


def _foreign_checkpoint(tmp: Path) -> list[str]:
    path = tmp / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    return ["eval", str(path)]


def _resume_all_corrupt(tmp: Path) -> list[str]:
    ckpt = tmp / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    (ckpt / "prev.pt").write_bytes(b"")
    return [*_train_argv(tmp, []), "--resume"]


# (case name, builder, fragments the one-line error must contain)
CORPUS: list[tuple[str, Builder, list[str]]] = [
    # --- COCO json
    ("malformed json", coco_text_case('{"images": [}'), ["instances.json: not valid JSON"]),
    ("truncated json", coco_text_case('{"images": [{"id": 1, "file_na'), ["instances.json: not valid JSON"]),
    ("json not an object", coco_text_case("[1, 2]"), ["instances.json: the top level must be a JSON object"]),
    ("missing json", coco_text_case(None), ["instances.json: file not found"]),
    ("missing images", coco_case(lambda d, r: d.pop("images")), ["missing top-level key 'images'"]),
    ("missing annotations", coco_case(lambda d, r: d.pop("annotations")), ["missing top-level key 'annotations'"]),
    ("missing categories", coco_case(lambda d, r: d.pop("categories")), ["missing top-level key 'categories'"]),
    ("duplicate image id", coco_case(_duplicate_image_id), ["images[1] (id 1", "duplicate image id 1"]),
    ("unknown image", coco_case(_set("annotations.0.image_id", 99)), ["annotations[0] (id 1)", "image_id 99"]),
    ("unknown category", coco_case(_set("annotations.1.category_id", 7)), ["annotations[1] (id 2)", "category_id 7"]),
    (
        "zero width",
        coco_case(_set("annotations.0.bbox", [1, 1, 0, 5])),
        ["annotations[0] (id 1)", "non-positive width"],
    ),
    (
        "negative height",
        coco_case(_set("annotations.2.bbox", [1, 1, 4, -2])),
        ["annotations[2] (id 3)", "non-positive height"],
    ),
    ("NaN coordinate", coco_case(_set("annotations.0.bbox", [float("nan"), 1, 4, 4])), ["(id 1)", "non-finite"]),
    ("infinite width", coco_case(_set("annotations.0.bbox", [1, 1, float("inf"), 4])), ["(id 1)", "non-finite"]),
    (
        "box sticks out (error policy)",
        coco_case(_set("annotations.0.bbox", [50, 50, 30, 10]), "data.out_of_image=error"),
        ["annotations[0] (id 1, image 'img0.png' 64x64)", "sticks out of the image by 16.0 px"],
    ),
    (
        "box outside the image",
        coco_case(_set("annotations.0.bbox", [70, 1, 5, 5])),
        ["annotations[0] (id 1, image 'img0.png' 64x64)", "lies outside the image"],
    ),
    ("zero image height", coco_case(_set("images.1.height", 0)), ["images[1] (id 2", "'height'"]),
    # --- image files
    (
        "missing image file",
        coco_case(_files(lambda r: (r / "images" / "img1.png").unlink())),
        ["images[1] (id 2, 'img1.png')", "image file not found", "img1.png"],
    ),
    (
        "zero-byte image",
        coco_case(_files(lambda r: (r / "images" / "img2.png").write_bytes(b""))),
        ["images[2] (id 3, 'img2.png')", "empty (0 bytes)"],
    ),
    (
        "not an image",
        coco_case(_files(lambda r: (r / "images" / "img0.png").write_text("hello, I am text"))),
        ["img0.png: cannot read the image header"],
    ),
    (
        "truncated header",
        coco_case(_files(lambda r: truncate(r / "images" / "img1.png", keep=0.002))),
        ["img1.png: cannot read the image header"],
    ),
    ("animated gif", coco_case(_animated), ["anim.gif: an animated GIF with 3 frames"]),
    (
        "size differs from annotation",
        coco_case(_files(lambda r: write_image(r / "images" / "img2.png", size=(48, 64)))),
        ["img2.png: the image is 48x64 but annotated as 64x64"],
    ),
    (
        "image root missing",
        lambda tmp: _train_argv(tmp, coco_overrides(make_coco(tmp / "coco"), tmp / "nowhere")),
        ["image root", "nowhere is not a folder"],
    ),
    # --- file names that escape the image root (safe loading)
    ("file_name with ..", coco_case(_set("images.0.file_name", "../instances.json")), ["escapes the image root"]),
    ("absolute file_name", coco_case(_set("images.0.file_name", "/etc/hostname")), ["is an absolute path"]),
    ("symlink out of the root", coco_case(_symlink_out), ["'link.png' resolves to", "outside the image root"]),
    # --- YOLO and VOC
    ("yolo wrong field count", yolo_case("0 0.5 0.5 0.2\n"), ["a.txt:1: expected 5 fields"]),
    ("yolo value outside [0, 1]", yolo_case("0 0.5 1.5 0.2 0.2\n"), ["a.txt:1: coordinates must be normalized"]),
    ("yolo NaN", yolo_case("0 nan 0.5 0.2 0.2\n"), ["a.txt:1: non-finite coordinate"]),
    ("voc not well-formed", voc_case("<annotation><size>"), ["000001.xml: not well-formed XML"]),
    ("voc without <size>", voc_case(VOC_XML.replace("<size>", "<sz>").replace("</size>", "</sz>")), ["missing <size>"]),
    (
        "voc without <bndbox>",
        voc_case(VOC_XML.replace("bndbox", "box")),
        ["000001.xml: object[0] (dog): missing <bndbox>"],
    ),
    ("voc entity bomb", voc_case(VOC_BOMB), ["000001.xml: refused unsafe XML (EntitiesForbidden"]),
    # --- config
    ("unknown key", config_case("weighting.intervall=3"), ["weighting.intervall: unknown key"]),
    ("unknown key in file", config_file_case("train:\n  max_itr: 3\n"), ["bad.yaml", "train.max_itr: unknown key"]),
    ("wrong type", config_case("train.max_iter=many"), ["train.max_iter", "integer"]),
    ("negative lr", config_case("train.optimizer.lr=-0.1"), ["train.optimizer.lr", "greater than 0"]),
    ("interval < 2", config_case("weighting.interval=1"), ["weighting.interval", "greater than or equal to 2"]),
    ("beta 0 with Bayesian smooth L1", config_case("loss.bayesian=true", "loss.beta=0"), ["loss.beta must be > 0"]),
    ("p_min > p_max", config_case("weighting.p_min=0.8", "weighting.p_max=0.3"), ["p_min must not exceed"]),
    ("negative corrupt count", config_case("data.max_corrupt_images=-1"), ["data.max_corrupt_images"]),
    ("malformed override", config_case("train.max_iter"), ["is not of the form KEY=VALUE"]),
    ("log_var_init keys", config_case("loss.bayesian=true", "loss.log_var_init={cls: 0.0}"), ["log_var_init"]),
    (
        "python tag in yaml",
        config_file_case("seed: !!python/object/apply:os.getcwd []\n"),
        ["bad.yaml: unsupported YAML tag !!python/object/apply:os.getcwd (line 1)"],
    ),
    ("config not found", lambda tmp: _train_argv(tmp, [], config=str(tmp / "nope.yaml")), ["nope.yaml: cannot read"]),
    # --- checkpoints
    ("checkpoint needing pickle", _evil_checkpoint, ["evil.pt: refused", "weights_only", "GLOBAL posix.system"]),
    ("truncated checkpoint", _truncated_checkpoint, ["cut.pt: corrupt or truncated checkpoint"]),
    ("not a robustdet checkpoint", _foreign_checkpoint, ["foreign.pt: not a robustdet checkpoint (no config"]),
    ("resume with only corrupt checkpoints", _resume_all_corrupt, ["no usable checkpoint", "last.pt", "prev.pt"]),
]


@pytest.mark.parametrize(("builder", "fragments"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_input_exits_2_with_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builder: Builder, fragments: list[str]
) -> None:
    argv = builder(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robustdet {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err
    # found before training started: the run directory holds no training log
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_yaml_tags_never_execute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "evil.yaml: unsupported YAML tag !!python/object/apply:os.system" in capsys.readouterr().err
    assert not marker.exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    """--debug: the traceback instead of the one line (exit 1). Here the error comes from a data worker
    during the final evaluation, and the process must still exit promptly (persistent workers shut down)."""
    coco_json = make_coco(tmp_path / "coco", num_images=4)
    truncate(tmp_path / "coco" / "images" / "img3.png", keep=0.9)
    extra = ["data.num_workers=1", "train.max_iter=1", "data.verify_images=false"]
    argv = _train_argv(tmp_path, [*coco_overrides(coco_json, tmp_path / "coco" / "images"), *extra])
    proc = subprocess.run(
        [sys.executable, "-m", "robustdet", "--debug", *argv],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "DatasetError: " in proc.stderr and "img3.png: cannot decode the image" in proc.stderr
