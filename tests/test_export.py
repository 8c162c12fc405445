"""``robustdet export``: the ONNX file (run by onnxruntime) and the TorchScript file (run by torch.jit.load)
give robustdet's eval-mode detections, ``model([image])``, on coco128 images, for all three detectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import resize

from robustdet.cli import main
from robustdet.config import load_config
from robustdet.engine.inference import load_trained, read_image
from robustdet.engine.state import CHECKPOINT_FORMAT
from robustdet.models import build_model
from tests.conftest import COCO128, REPO, tiny_overrides

pytestmark = [
    pytest.mark.coco128,
    pytest.mark.skipif(not COCO128.is_dir(), reason=f"{COCO128} is absent"),
]

# landscape 426x640, portrait 640x586 and 500x375: three sizes and both orientations
IMAGES = ["000000000139.jpg", "000000000285.jpg", "000000000724.jpg"]
EXPORT_SIZE = (96, 128)  # H, W of the fixed-size exports
# every detection above threshold, so that the comparison covers the whole post-processing
EXPORT_OVERRIDES = ["model.score_thresh=0.0"]
# Tolerances: float32 arithmetic in another order (onnxruntime's kernels); the maxima measured here
# (printed with -s, table in docs/export.md) were 1.8e-4 px and 7.0e-7 for ONNX, 0 and 0 for TorchScript.
BOX_ATOL = 1e-2  # pixels of the input image
SCORE_ATOL = 1e-5
DETECTORS = {
    "retinanet": {},
    # the paper's two-fc box head and one anchor scale, as configs/faster_rcnn_synthetic.yaml
    "faster_rcnn": {"model.head_norm": "none", "model.anchor_scales": "[1.0]"},
    "fcos": {"model.anchor_sizes": None},  # FCOS has regression ranges, not anchors
}


def _save_checkpoint(tmp: Path, name: str) -> Path:
    """A random-init checkpoint with the entries ``Trainer._state`` writes that ``load_trained`` reads."""
    cfg = load_config(REPO / "configs" / "default.yaml", tiny_overrides(tmp, {"model.name": name, **DETECTORS[name]}))
    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(cfg.data.synthetic.num_classes)]
    model = build_model(cfg, len(classes))
    path = tmp / f"{name}.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "iteration": 0,
            "config": cfg.model_dump(mode="json"),
            "classes": classes,
            "category_ids": list(range(1, len(classes) + 1)),
            "model": model.state_dict(),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export")
    return {name: _save_checkpoint(tmp, name) for name in DETECTORS}


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """coco128 images as the exported programs take them: float32 RGB [3, H, W] in [0, 1]."""
    return [read_image(COCO128 / "images" / "val2017" / name).float().div(255) for name in IMAGES]


Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Runner = Callable[[torch.Tensor], Detections]


def compare(ref: Detections, got: Detections, nms_thresh: float) -> tuple[int, float, float]:
    """Match ``got`` to ``ref`` (boxes, scores, labels); returns (matches, max box diff, max score diff).

    Each reference detection needs an exported one of the same label with every box coordinate within
    BOX_ATOL and the score within SCORE_ATOL. A random-init model scores many boxes alike, so two
    exceptions are allowed, both near-ties that the other runtime's last-bit differences may break the
    other way: a detection at the cut (score within SCORE_ATOL of the lowest kept one), and one that NMS
    kept instead of an overlapping same-label box (IoU > nms_thresh) whose score is within SCORE_ATOL.
    """
    rb, rs, rl = ref[0].double(), ref[1].double(), ref[2]
    gb, gs, gl = got[0].double(), got[1].double(), got[2]
    assert gl.dtype == torch.int64 and gb.shape == (len(gs), 4) and gl.shape == gs.shape
    assert len(rs) > 0, "no reference detections: the comparison would be vacuous"
    close = (
        (rl[:, None] == gl[None])
        & ((rb[:, None] - gb[None]).abs().amax(dim=2) <= BOX_ATOL)
        & ((rs[:, None] - gs[None]).abs() <= SCORE_ATOL)
    )
    used = torch.zeros(len(gs), dtype=torch.bool)
    pairs = []
    for i in torch.argsort(rs, descending=True).tolist():
        free = torch.nonzero(close[i] & ~used).flatten()
        if len(free):
            j = int(free[torch.argmin((rb[i] - gb[free]).abs().amax(dim=1))])
            used[j] = True
            pairs.append((i, j))
    matched_ref = torch.zeros(len(rs), dtype=torch.bool)
    for i, _ in pairs:
        matched_ref[i] = True
    cut = min(float(rs.min()), float(gs.min()) if len(gs) else 1.0) + SCORE_ATOL
    lone_ref, lone_got = torch.nonzero(~matched_ref).flatten(), torch.nonzero(~used).flatten()
    for boxes, scores, labels, lone, ob, os_, ol, other in (
        (rb, rs, rl, lone_ref, gb, gs, gl, lone_got),
        (gb, gs, gl, lone_got, rb, rs, rl, lone_ref),
    ):
        for k in lone.tolist():
            if float(scores[k]) <= cut:
                continue
            swapped = (
                (ol[other] == labels[k])
                & ((os_[other] - scores[k]).abs() <= SCORE_ATOL)
                & (box_iou(boxes[k : k + 1], ob[other])[0] > nms_thresh)
            )
            assert bool(swapped.any()), f"detection {boxes[k].tolist()} {float(scores[k])} {int(labels[k])} unmatched"
    assert len(pairs) >= 0.9 * len(rs), f"only {len(pairs)} of {len(rs)} detections match"
    i, j = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    return len(pairs), float((rb[i] - gb[j]).abs().max()), float((rs[i] - gs[j]).abs().max())


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> Callable[[str], tuple[Runner, float]]:
    """Per detector: robustdet's eval mode, ``model([image])``, and its NMS threshold."""
    cache: dict[str, tuple[Runner, float]] = {}

    def get(name: str) -> tuple[Runner, float]:
        if name not in cache:
            loaded = load_trained(checkpoints[name], EXPORT_OVERRIDES)
            model = loaded.model.cpu().eval()
            m = loaded.cfg.model
            # Faster R-CNN's RoI pooler infers its feature scales from its first image; the export sets
            # it up on a square min_size image (export.set_up), so the reference starts the same way
            with torch.no_grad():
                model([torch.full((3, m.min_size, m.min_size), 0.5)])

            @torch.no_grad()
            def run(image: torch.Tensor) -> Detections:
                det = model([image])[0]
                return det["boxes"], det["scores"], det["labels"]

            cache[name] = (run, m.nms_thresh)
        return cache[name]

    return get


def _run_onnx(path: Path) -> Runner:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tests share two cores
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor) -> Detections:
        boxes, scores, labels = session.run(None, {"image": image.numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)

    return run


def _run_torchscript(path: Path) -> Runner:
    program = torch.jit.load(str(path))

    def run(image: torch.Tensor) -> Detections:
        with torch.no_grad():
            return program(image)

    return run


@pytest.mark.parametrize(
    ("name", "fmt", "dynamic"),
    [
        ("retinanet", "onnx", False),
        ("retinanet", "torchscript", False),
        ("fcos", "onnx", True),
        ("fcos", "torchscript", False),
        ("faster_rcnn", "onnx", True),
        ("faster_rcnn", "torchscript", False),
    ],
)
def test_exported_file_gives_eval_mode_detections(
    checkpoints, reference, images, tmp_path, capsys, name, fmt, dynamic
):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}"
    argv = ["export", str(checkpoints[name]), *EXPORT_OVERRIDES, "--format", fmt, "--out", str(out),
            "--size", *map(str, EXPORT_SIZE), *(["--dynamic"] if dynamic else [])]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    run = _run_onnx(out) if fmt == "onnx" else _run_torchscript(out)
    # the export size; plus the images' own sizes where the program takes any size (a dynamic ONNX
    # graph; a TorchScript trace in either mode, see docs/export.md)
    inputs = [resize(img, list(EXPORT_SIZE)) for img in images]
    if dynamic or fmt == "torchscript":
        inputs += images
    expected, nms_thresh = reference(name)
    for image in inputs:
        matched, box_diff, score_diff = compare(expected(image), run(image), nms_thresh)
        print(f"{name} {fmt} {'dynamic' if dynamic else 'fixed'} {tuple(image.shape[1:])}: {matched} matched, "
              f"max |Δbox| {box_diff:.2e} px, max |Δscore| {score_diff:.2e}")
    if fmt == "onnx" and not dynamic:
        with pytest.raises(Exception, match=r"[Ii]nvalid dimensions"):
            run(images[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "--format 'tflite': not one of onnx, torchscript"),
        (["--format", "onnx", "--size", "0", "64"], "--size (0, 64): needs two positive integers"),
    ],
)
def test_bad_options_are_one_line_errors(checkpoints, tmp_path, capsys, args, message):
    assert main(["export", str(checkpoints["retinanet"]), *args, "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["export", str(missing), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such checkpoint file" in err and err.count("\n") == 1
