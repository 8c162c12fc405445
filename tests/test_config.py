from pathlib import Path

import pytest

from robustdet.config import Config, ConfigError, config_to_yaml, load_config, parse_overrides

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
        (["weighting.p_min=0.8", "weighting.p_max=0.2"], "p_min"),
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
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
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
