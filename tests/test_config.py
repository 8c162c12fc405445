from pathlib import Path

import pytest

from robustdet.config import Config, config_to_yaml, load_config, parse_overrides
from robustdet.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None)
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None, ["train.max_iter=200", "weighting.name=rlo", "weighting.interval=10", "loss.bayesian=true",
               "model.anchor_sizes=[8, 16, 32, 64, 128]"]
    )
    assert cfg.train.max_iter == 200 and cfg.weighting.name == "rlo" and cfg.weighting.interval == 10
    assert cfg.loss.bayesian is True
    assert cfg.model.anchor_sizes == [8, 16, 32, 64, 128]


def test_parse_overrides_rejects_malformed():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.max_iter"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train..max_iter=3"])


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("weighting.intervall=3", "weighting.intervall: unknown key"),
        ("train.max_iter=abc", "train.max_iter"),
        ("train.optimizer.lr=-0.1", "train.optimizer.lr"),
        ("weighting.interval=1", "weighting.interval"),
        ("model.backbone=vgg16", "model.backbone"),
        ("loss.beta=-1", "loss.beta"),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert names in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["weighting.name=rlo", "weighting.p_min=0.8", "weighting.p_max=0.2"], "p_min must not exceed"),
        (["loss.bayesian=true", "loss.box_loss=giou"], "GIoU has no Bayesian form"),
        (["loss.bayesian=true", "loss.beta=0"], "loss.beta must be > 0"),
        # checked once here for every detector, not in each model
        (["loss.bayesian=true", "loss.box_loss=l1"], "L1 has none; use loss.box_loss=smooth_l1"),
        (["model.fg_iou_thresh=0.3", "model.bg_iou_thresh=0.4"], "bg_iou_thresh"),
        (["train.max_iter=100", "train.schedule.steps=[50, 150]"], "train.schedule.steps"),
    ],
)
def test_impossible_combinations(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: model.backbon: unknown key"):
        load_config(typo)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: unsupported YAML tag !!python/object/apply:os\.system"):
        load_config(evil)
    custom = tmp_path / "custom.yaml"
    custom.write_text("train:\n  max_iter: !Iterations 3\n")
    with pytest.raises(ConfigError, match=r"custom\.yaml: unsupported YAML tag !Iterations \(line 2\)"):
        load_config(custom)


def test_every_shipped_config_validates():
    # sweep files (configs/sweeps/) describe grids of run configs, not a run config: tests/test_sweep.py
    configs = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.parts)
    assert configs, "configs/ is empty"
    for path in configs:
        assert isinstance(load_config(path), Config), path


def test_base_files_merge_underneath(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {backbone: resnet18, fpn_channels: 64}\ntrain: {max_iter: 10}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel: {fpn_channels: 32}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.backbone, cfg.model.fpn_channels, cfg.train.max_iter) == ("resnet18", 32, 10)
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


# --- components own their sections ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=faster_rcnn", "model.fg_iou_thresh=0.6"],
         "model.fg_iou_thresh: unknown key for model name=faster_rcnn"),
        (["weighting.name=equal", "weighting.interval=5"], "weighting.interval: unknown key for weighting name=equal"),
        (["weighting.name=uw", "weighting.lambdas=[1, 1]"], "weighting.lambdas: unknown key for weighting name=uw"),
        (["data.train.format=synthetic", "data.train.path=x.json"],
         "data.train.path: unknown key for data.train format=synthetic"),
        (["weighting.name=nope"], "weighting: Input tag 'nope' found using 'name' is not one of"),
        (["model.name=fcos", "model.anchor_sizes=[32, 64, 128, 256, 512]"],
         "model.regression_ranges, the boundaries between levels, i.e. the old anchor_sizes[1:] [64, 128, 256, 512]"),
    ],
)
def test_a_key_the_component_does_not_use_names_key_and_component(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_switching_a_component_drops_the_old_components_keys(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        "weighting: {name: rlo, interval: 50, rl_step: 0.02}\nmodel: {name: retinanet, fg_iou_thresh: 0.6}\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nweighting: {name: dwa}\nmodel: {name: fcos}\n")
    cfg = load_config(child)
    # interval is DWA's too and stays; rl_step (RLO's) and fg_iou_thresh (RetinaNet's) go with their component
    assert cfg.weighting.name == "dwa" and cfg.weighting.interval == 50
    assert cfg.model.name == "fcos"
    assert load_config(base, ["weighting.name=equal"]).weighting.name == "equal"
    with pytest.raises(ConfigError, match=r"weighting\.rl_step: unknown key for weighting name=equal"):
        load_config(base, ["weighting.name=equal", "weighting.rl_step=0.1"])


def test_stored_configs_of_older_runs_still_load():
    # a resolved config as robustdet wrote it when model and weighting were one flat section each
    old = {
        "model": {"name": "fcos", "anchor_sizes": [8, 16, 32, 64, 128], "fg_iou_thresh": 0.5, "topk_candidates": 10},
        "weighting": {"name": "equal", "interval": 100, "lambdas": [1.5, 1.0], "rl_step": 0.01},
    }
    from robustdet.config import config_from_stored

    cfg = config_from_stored(old, "old run")
    assert cfg.model.regression_ranges == [16, 32, 64, 128] and cfg.model.topk_candidates == 10
    assert cfg.weighting.name == "equal"
    with pytest.raises(ConfigError, match=r"model\.scoer_thresh: unknown key"):
        config_from_stored(old, "old run", ["model.scoer_thresh=0.1"])
