"""Label noise (data.train.label_noise, robustdet noise): rates, determinism, geometry, ids, errors, runs."""

import copy
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from robustdet.cli import main
from robustdet.config import DataConfig, load_config
from robustdet.data import build_dataset, load_synthetic, validate_coco
from robustdet.data.noise import LabelNoiseConfig, apply_label_noise, flip_partners, sidecar_path
from robustdet.data.synthetic import SyntheticSource
from robustdet.errors import ConfigError
from tests.conftest import REPO, tiny_overrides

CATEGORY_IDS = [3, 7, 8, 20, 21]  # gaps and an odd count: labels 0..4 in this order
WIDTH, HEIGHT = 640, 480
N_BOXES, N_CROWD = 4000, 50


def _coco(n_boxes: int = N_BOXES, seed: int = 0, near_edges: bool = False) -> dict:
    """A COCO dict (no image files) with boxes well inside the image, so that a jitter of r <= 0.3
    never reaches the border; ``near_edges`` puts them anywhere instead, down to sub-pixel sizes."""
    rng = random.Random(seed)
    images = [{"id": i, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT} for i in range(1, 101)]
    annotations = []
    for k in range(n_boxes + N_CROWD):
        if near_edges:
            w, h = rng.choice([0.3, 2.0, rng.uniform(1, WIDTH)]), rng.choice([0.5, 3.0, rng.uniform(1, HEIGHT)])
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        else:
            w, h = rng.uniform(10, 60), rng.uniform(10, 60)
            x, y = rng.uniform(100, 400), rng.uniform(100, 300)
        annotations.append({
            "id": 10 * k + 5,  # not contiguous, not starting at 1
            "image_id": rng.randint(1, 100),
            "category_id": rng.choice(CATEGORY_IDS),
            "bbox": [x, y, w, h],
            "area": w * h,
            "iscrowd": int(k >= n_boxes),
        })
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def _by_id(data: dict) -> dict[int, dict]:
    return {a["id"]: a for a in data["annotations"]}


def _within_binomial(successes: int, trials: int, p: float) -> bool:
    # 4 standard errors of a binomial proportion: a false alarm about once in 16,000 runs
    return abs(successes / trials - p) <= 4 * math.sqrt(p * (1 - p) / trials)


def test_realised_rates_match_requested():
    data = _coco()
    before = copy.deepcopy(data)
    cfg = LabelNoiseConfig(class_flip=0.2, box_jitter=0.2, drop=0.1, spurious=0.3, seed=7)
    noisy, report = apply_label_noise(data, cfg)
    assert data == before  # the input is not modified
    old, new = _by_id(data), _by_id(noisy)
    eligible = [a for a in data["annotations"] if not a["iscrowd"]]
    assert report["annotations"] == N_BOXES and report["crowd_untouched"] == N_CROWD

    # drops: the ids that are gone, counted from the output
    gone = sorted(set(old) - set(new))
    assert gone == report["changed"]["drop"]
    assert _within_binomial(len(gone), N_BOXES, 0.1)
    assert report["realised"]["drop"] == len(gone) / N_BOXES

    # flips, among the kept boxes: never to the same class, the offset uniform over the 4 others
    kept = [a for a in eligible if a["id"] in new]
    flipped = [a for a in kept if new[a["id"]]["category_id"] != a["category_id"]]
    assert [a["id"] for a in flipped] == report["changed"]["class_flip"]
    assert _within_binomial(len(flipped), len(kept), 0.2)
    offsets = [
        (CATEGORY_IDS.index(new[a["id"]]["category_id"]) - CATEGORY_IDS.index(a["category_id"])) % 5 for a in flipped
    ]
    assert stats.chisquare(np.bincount(offsets, minlength=5)[1:]).pvalue > 1e-4

    # jitter: each edge moved by U(-r, r) times the side (no box reaches the border here)
    shifts = []
    for a in kept:
        x, y, w, h = a["bbox"]
        nx, ny, nw, nh = new[a["id"]]["bbox"]
        shifts += [(nx - x) / w, (nx + nw - x - w) / w, (ny - y) / h, (ny + nh - y - h) / h]
        assert new[a["id"]]["area"] == pytest.approx(nw * nh)
    shifts = np.asarray(shifts)
    assert stats.kstest(shifts, stats.uniform(loc=-0.2, scale=0.4).cdf).pvalue > 1e-4
    # |U(-r, r)| is U(0, r): mean r/2, variance r^2/12, so 2 x mean |shift| estimates r
    estimate = 2 * np.abs(shifts).mean()
    assert abs(estimate - 0.2) <= 4 * 2 * math.sqrt(0.2**2 / 12 / len(shifts))
    assert report["realised"]["box_jitter"] == pytest.approx(estimate, rel=1e-9)
    assert report["counts"]["box_jitter"] == len(kept)

    # spurious: new ids, about 0.3 per original box, inside their image, sizes from the dataset's boxes
    added = [a for a in noisy["annotations"] if a["id"] not in old]
    assert [a["id"] for a in added] == report["added"]
    assert _within_binomial(len(added), N_BOXES, 0.3)
    sizes = {(a["bbox"][2], a["bbox"][3]) for a in eligible}
    for a in added:
        x, y, w, h = a["bbox"]
        assert (w, h) in sizes and x >= 0 and x + w <= WIDTH and y >= 0 and y + h <= HEIGHT
        assert a["iscrowd"] == 0 and a["category_id"] in CATEGORY_IDS
    assert stats.chisquare([sum(a["category_id"] == c for a in added) for c in CATEGORY_IDS]).pvalue > 1e-4

    # crowd regions are never touched
    for a in data["annotations"]:
        if a["iscrowd"]:
            assert new[a["id"]] == a


def test_pair_flips_go_to_the_fixed_partner():
    assert flip_partners(5) == [1, 0, 3, 2, 3] and flip_partners(2) == [1, 0]
    data = _coco(2000)
    noisy, report = apply_label_noise(data, LabelNoiseConfig(class_flip=0.5, flip_mode="pairs", seed=1))
    partner = {3: 7, 7: 3, 8: 20, 20: 8, 21: 20}  # by category id; 21, the odd one out, flips to its neighbour
    new = _by_id(noisy)
    flipped = [a for a in data["annotations"] if new[a["id"]]["category_id"] != a["category_id"]]
    assert len(flipped) == len(report["changed"]["class_flip"]) and _within_binomial(len(flipped), 2000, 0.5)
    assert all(new[a["id"]]["category_id"] == partner[a["category_id"]] for a in flipped)
    assert report["flip_pairs"] == [[c, partner[c]] for c in CATEGORY_IDS]


def test_same_seed_same_output_in_any_order_other_seed_differs():
    data = _coco(500)
    cfg = LabelNoiseConfig(class_flip=0.3, box_jitter=0.1, drop=0.2, spurious=0.2, seed=3)
    a, report_a = apply_label_noise(data, cfg)
    b, report_b = apply_label_noise(copy.deepcopy(data), cfg)
    assert a == b and report_a == report_b
    # the draws depend on (seed, kind, annotation id), not on the position in the list
    shuffled = copy.deepcopy(data)
    random.Random(0).shuffle(shuffled["annotations"])
    c, report_c = apply_label_noise(shuffled, cfg)
    assert _by_id(c) == _by_id(a) and report_c == report_a
    d, report_d = apply_label_noise(data, cfg.model_copy(update={"seed": 4}))
    for kind in ("class_flip", "drop"):
        assert report_d["changed"][kind] != report_a["changed"][kind], kind
    assert report_d["added"] != report_a["added"]
    boxes_a = {i: a["bbox"] for i, a in _by_id(a).items()}
    assert sum(boxes_a.get(i) != ann["bbox"] for i, ann in _by_id(d).items()) > 100  # the jitter differs too


def test_no_box_leaves_the_image_or_degenerates():
    data = _coco(3000, seed=1, near_edges=True)
    noisy, report = apply_label_noise(data, LabelNoiseConfig(box_jitter=1.0, spurious=1.0, seed=2))
    assert report["counts"]["box_jitter"] == 3000 and report["counts"]["spurious"] == 3000
    for a in noisy["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        assert x >= 0 and x + w <= WIDTH + 1e-9 and y >= 0 and y + h <= HEIGHT + 1e-9, a
        assert w >= 1 - 1e-9 and h >= 1 - 1e-9, a
    # the result is a valid COCO dict (positive sizes, known ids)
    validate_coco(noisy, "noisy", REPO, check_files=False)


def test_ids_flips_and_jitter_keep_drop_removes_spurious_adds_unique():
    data = _coco(1000)
    ids = {a["id"] for a in data["annotations"]}
    noisy, report = apply_label_noise(data, LabelNoiseConfig(class_flip=0.5, box_jitter=0.3, seed=5))
    assert [a["id"] for a in noisy["annotations"]] == [a["id"] for a in data["annotations"]]
    assert report["counts"]["class_flip"] > 0 and report["added"] == []
    noisy, report = apply_label_noise(data, LabelNoiseConfig(drop=0.3, spurious=0.5, seed=5))
    new_ids = [a["id"] for a in noisy["annotations"]]
    assert len(new_ids) == len(set(new_ids))
    assert ids - set(new_ids) == set(report["changed"]["drop"])
    assert set(new_ids) - ids == set(report["added"])
    assert min(report["added"]) == max(ids) + 1 and len(report["added"]) == report["counts"]["spurious"] > 0


def test_the_validation_split_refuses_noise(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.val\.label_noise"):
        load_config(None, ["data.val.label_noise.drop=0.1"])
    data_cfg = DataConfig.model_validate({"synthetic": {"num_train": 4, "num_val": 2, "image_size": 32,
                                                        "cache_dir": str(tmp_path)}})
    noisy_source = SyntheticSource(split="val", label_noise=LabelNoiseConfig(drop=0.1))
    with pytest.raises(ConfigError, match="never noised"):
        build_dataset(noisy_source, data_cfg, train=False)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("class_flip=1.5", "class_flip"),
        ("drop=-0.1", "drop"),
        ("box_jitter=2", "box_jitter"),
        ("spurious=1.01", "spurious"),
        ("flip_mode=triples", "flip_mode"),
        ("flip=0.1", "flip"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"data\.train\.label_noise\.{key}: "):
        load_config(None, [f"data.train.label_noise.{override}"])


def test_flipping_a_single_category_is_an_error():
    data = _coco(10)
    data["categories"] = data["categories"][:1]
    for a in data["annotations"]:
        a["category_id"] = CATEGORY_IDS[0]
    with pytest.raises(ConfigError, match="class_flip"):
        apply_label_noise(data, LabelNoiseConfig(class_flip=0.1))


def test_box_jitter_classes_moves_only_those_classes_boxes():
    data = _coco(400)
    cls = CATEGORY_IDS[1]
    noisy, report = apply_label_noise(data, LabelNoiseConfig(box_jitter=0.2, box_jitter_classes=[cls], seed=3))
    old, new = _by_id(data), _by_id(noisy)
    moved = {i for i in old if old[i]["bbox"] != new[i]["bbox"]}
    of_class = {i for i, a in old.items() if a["category_id"] == cls and not a["iscrowd"]}
    assert moved == of_class and len(moved) > 50
    assert sorted(report["changed"]["box_jitter"]) == sorted(moved)
    everything, _ = apply_label_noise(data, LabelNoiseConfig(box_jitter=0.2, seed=3))
    for i in moved:  # the same draws as the all-class jitter: only the selection differs
        assert new[i]["bbox"] == _by_id(everything)[i]["bbox"]
    with pytest.raises(ConfigError, match=r"box_jitter_classes: category id\(s\) \[999\] are not in dataset"):
        apply_label_noise(data, LabelNoiseConfig(box_jitter=0.2, box_jitter_classes=[999]))


def test_noise_command_end_to_end(tmp_path, capsys):
    src = tmp_path / "train.json"
    src.write_text(json.dumps(_coco(1000), indent=1))
    before = src.read_bytes()
    dst = tmp_path / "out" / "noisy.json"
    argv = ["noise", str(src), str(dst), "--class-flip", "0.2", "--flip-mode", "pairs", "--box-jitter", "0.1",
            "--drop", "0.1", "--spurious", "0.2", "--seed", "9"]
    assert main(argv) == 0
    assert src.read_bytes() == before
    assert "noisy.json" in capsys.readouterr().out
    sidecar = sidecar_path(dst)
    assert sidecar == tmp_path / "out" / "noisy.label_noise.json"
    report = json.loads(sidecar.read_text())
    expected_data, expected_report = apply_label_noise(
        validate_coco(json.loads(before), str(src), tmp_path, check_files=False),
        LabelNoiseConfig(class_flip=0.2, flip_mode="pairs", box_jitter=0.1, drop=0.1, spurious=0.2, seed=9),
        str(src),
    )
    assert report == json.loads(json.dumps(expected_report))
    assert json.loads(dst.read_text()) == json.loads(json.dumps(expected_data))
    validate_coco(json.loads(dst.read_text()), str(dst), tmp_path, check_files=False)

    # the source is never the destination, however it is spelled
    same = tmp_path / "out" / ".." / "train.json"
    assert main(["noise", str(src), str(same), "--drop", "0.5"]) == 2
    assert "is the source" in capsys.readouterr().err
    assert src.read_bytes() == before
    # bad options name the flag
    assert main(["noise", str(src), str(tmp_path / "x.json"), "--class-flip", "2"]) == 2
    assert "--class-flip: " in capsys.readouterr().err
    assert main(["noise", str(src), str(tmp_path / "x.json"), "--flip-mode", "triples"]) == 2
    assert "--flip-mode: " in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


NOISE = {
    "data.train.label_noise.class_flip": 0.3,
    "data.train.label_noise.box_jitter": 0.1,
    "data.train.label_noise.drop": 0.2,
    "data.train.label_noise.spurious": 0.2,
    "data.train.label_noise.seed": 1,
    "train.max_iter": 4,
    "checkpoint.period": 2,
    "weighting.name": "equal",
}


def test_training_with_label_noise_writes_the_report_and_resumes_on_the_same_labels(tmp_path):
    config = str(REPO / "configs" / "default.yaml")
    run = tmp_path / "run"
    assert main(["train", config, *tiny_overrides(tmp_path, NOISE), "--out", str(run)]) == 0
    report = json.loads((run / "label_noise.json").read_text())

    # independently: the same noise applied to the synthetic training dict
    cfg = load_config(config, tiny_overrides(tmp_path, NOISE))
    clean, _ = load_synthetic(cfg.data.synthetic, "train")
    noisy, expected = apply_label_noise(clean, cfg.data.train.label_noise, "synthetic train")
    assert report == json.loads(json.dumps(expected))
    assert all(report["counts"][k] > 0 for k in ("class_flip", "box_jitter", "drop", "spurious")), report["counts"]
    # what the trainer trains on: the noisy boxes and labels, image by image; the validation set is clean
    train_set = build_dataset(cfg.data.train, cfg.data, train=True)
    assert train_set.label_noise == expected
    for index in range(len(train_set)):
        target = train_set.target(index)
        anns = sorted(
            (a for a in noisy["annotations"] if a["image_id"] == target["image_id"]), key=lambda a: a["id"]
        )
        got = sorted(zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True))
        want = sorted(
            ([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
             train_set.category_ids.index(a["category_id"])) for a in anns
        )
        assert len(got) == len(want) and all(
            g[1] == w[1] and np.allclose(g[0], w[0], atol=1e-4) for g, w in zip(got, want, strict=True)
        )
    val_set = build_dataset(cfg.data.val, cfg.data, train=False)
    assert val_set.label_noise is None

    # resumed from the checkpoint at iteration 2: the same noisy labels, so the same weights at the end
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (resumed / "checkpoints" / "last.pt").unlink()
    (resumed / "label_noise.json").unlink()
    assert main(["train", config, *tiny_overrides(tmp_path, NOISE), "--out", str(resumed), "--resume"]) == 0
    assert (resumed / "label_noise.json").read_bytes() == (run / "label_noise.json").read_bytes()
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
