"""Grouping runs over seeds, their statistics against a hand computation, baselines, warnings and figures,
on made-up metrics (no training): robustdet.runs.compare, robustdet.plots.compare_figures, ``robustdet compare``."""

import json
import math

import pytest

from robustdet.cli import main
from robustdet.config import Config, config_from_dict, config_to_yaml
from robustdet.errors import ConfigError
from robustdet.plots.compare_figures import plot_comparison
from robustdet.runs.compare import (
    baselines,
    build_comparison,
    group_runs,
    mean_std,
    paired_difference,
    t_interval,
)
from robustdet.runs.reader import Run, final_sigmas

T_975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables: 4.303)

BASE_AP = {0: 10.0, 1: 12.0, 2: 11.0}
AVW_AP = {0: 11.5, 1: 13.0, 2: 13.5}


def _run(name, seed, ap, config=None, labels=None, grid_keys=(), evals=None, sigmas=None):
    return Run(name=name, seed=seed, config=config or {}, metrics={"AP": ap, "AP50": 2 * ap},
               sigmas=sigmas or {}, labels=labels, grid_keys=grid_keys, evals=evals or [])


def _method_runs(extra=None):
    runs = [_run(f"base{s}", s, ap, {"weighting.name": "equal"}) for s, ap in BASE_AP.items()]
    runs += [_run(f"avw{s}", s, ap, {"weighting.name": "avw", **(extra or {})}) for s, ap in AVW_AP.items()]
    return runs


def test_mean_std_and_paired_difference_by_hand():
    # baseline 10, 12, 11: mean 11, squared deviations 1 + 1 + 0 over n - 1 = 2 -> std 1
    assert mean_std(list(BASE_AP.values())) == pytest.approx((11.0, 1.0))
    # avw 11.5, 13, 13.5: mean 38/3, deviations -7/6, 1/3, 5/6 -> (49 + 4 + 25)/36 / 2 = 13/12
    assert mean_std(list(AVW_AP.values())) == pytest.approx((38 / 3, math.sqrt(13 / 12)))
    # differences by seed 1.5, 1.0, 2.5: mean 5/3, deviations -1/6, -2/3, 5/6 -> (1 + 16 + 25)/36 / 2 = 7/12;
    # half width t * sqrt(7/12) / sqrt(3) = t * sqrt(7) / 6
    d = paired_difference(AVW_AP, BASE_AP)
    half = T_975_DF2 * math.sqrt(7) / 6
    assert d.n == 3
    assert d.mean == pytest.approx(5 / 3)
    assert d.std == pytest.approx(math.sqrt(7 / 12))
    assert (d.low, d.high) == pytest.approx((5 / 3 - half, 5 / 3 + half))
    assert (d.low, d.high) == pytest.approx((-0.230625, 3.563958), abs=1e-6)


def test_pairing_uses_only_common_seeds_and_small_samples_give_nan():
    d = paired_difference({**AVW_AP, 7: 100.0}, {**BASE_AP, 9: -100.0})
    assert d.n == 3 and d.mean == pytest.approx(5 / 3)
    one = paired_difference({0: 2.0}, {0: 1.0})
    assert one.mean == 1.0 and math.isnan(one.std) and math.isnan(one.low) and math.isnan(one.high)
    assert all(math.isnan(x) for x in t_interval([3.0]))
    mean, std = mean_std([4.0])
    assert mean == 4.0 and math.isnan(std)


def test_grouping_labels_groups_by_the_keys_they_differ_in():
    runs = _method_runs()
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["weighting.name=equal", "weighting.name=avw"]
    assert [g.seeds for g in groups] == [[0, 1, 2], [0, 1, 2]]
    assert groups[1].values("AP") == AVW_AP
    comp = build_comparison(runs, baseline="weighting.name=equal")
    assert comp.warnings == []
    assert comp.replicated
    text = comp.text()
    assert "11.00 ± 1.00" in text  # baseline AP
    assert f"+1.67 [{5 / 3 - T_975_DF2 * math.sqrt(7) / 6:+.2f}, {5 / 3 + T_975_DF2 * math.sqrt(7) / 6:+.2f}]" in text


def test_a_group_with_one_seed_shows_its_value_without_a_spread():
    runs = _method_runs()
    runs = [r for r in runs if r.name != "avw1" and r.name != "avw2"]  # avw has seed 0 only, so far
    text = build_comparison(runs, baseline="weighting.name=equal", metrics=["AP"]).text()
    row = next(line for line in text.splitlines() if line.startswith("weighting.name=avw "))
    assert row.split()[1:] == ["1", "0", "11.50"]
    diff = next(line for line in text.splitlines() if line.startswith("weighting.name=avw  weighting.name=equal"))
    assert diff.split()[2:] == ["1", "+1.50", "(one", "seed)"]
    assert "nan" not in text


def test_result_config_leaves_out_seed_and_settings_that_cannot_change_a_result(tmp_path):
    from robustdet.runs.reader import load_run

    for name, seed, workers in (("a", 0, 0), ("b", 1, 3)):
        d = tmp_path / name
        d.mkdir()
        cfg = Config(seed=seed)
        cfg.data.num_workers = workers
        cfg.log.period = 5 + seed
        (d / "config.yaml").write_text(config_to_yaml(cfg))
        (d / "metrics.json").write_text(json.dumps({"bbox": {"AP": 1.0 + seed}}))
    runs = [load_run(tmp_path / "a"), load_run(tmp_path / "b")]
    assert runs[0].config == runs[1].config and "seed" not in runs[0].config
    groups = group_runs(runs)
    assert len(groups) == 1 and groups[0].label == "all runs" and groups[0].seeds == [0, 1]


def test_warning_when_runs_differ_beyond_the_compared_keys():
    runs = _method_runs(extra={"train.max_iter": 500, "data.train.path": "other.json"})
    comp = build_comparison(runs, baseline="weighting.name=equal")
    assert len(comp.warnings) == 1
    w = comp.warnings[0]
    assert "train.max_iter" in w and "data.train.path" in w and "weighting.name" not in w.split(":")[1]
    # the labels still tell the groups apart by every differing key
    assert comp.groups[1].label.startswith("weighting.name=avw train.max_iter=500")
    # naming the keys the comparison is about silences it only for those
    assert "data.train.path" in build_comparison(runs, by=["weighting.", "train.max_iter"]).warnings[0]
    assert build_comparison(runs, by=["weighting.", "train.", "data."]).warnings == []


def test_sweep_labels_and_grid_keys_from_cells():
    runs = []
    for method, wname in (("baseline", "equal"), ("avw", "avw")):
        for noise in ("0", "20"):
            for seed in (0, 1, 2):
                cfg = {"weighting.name": wname, "data.noise": noise, "train.max_iter": 10}
                runs.append(_run(f"{method}{noise}{seed}", seed, 10 + seed + (method == "avw") + int(noise) / 10,
                                 cfg, {"method": method, "noise": noise}, ("weighting.name", "data.noise")))
    runs[-1].config["train.max_iter"] = 20  # one cell run longer: a new group, and a warning
    comp = build_comparison(runs[:-1], baseline="method=baseline")
    assert comp.warnings == []
    assert [g.label for g in comp.groups] == [
        "method=baseline noise=0", "method=baseline noise=20", "method=avw noise=0", "method=avw noise=20"]
    # method=baseline fixes one label: each group is compared with the baseline at its own noise level
    assert {k: v.label if v else None for k, v in comp.base.items()} == {
        "method=baseline noise=0": None, "method=baseline noise=20": None,
        "method=avw noise=0": "method=baseline noise=0", "method=avw noise=20": "method=baseline noise=20"}
    d = paired_difference(comp.groups[3].values("AP"), comp.groups[1].values("AP"))
    assert d.mean == pytest.approx(1.0) and d.std == pytest.approx(0.0)
    # without the baseline at noise 20, avw at 20 has none (not the baseline at noise 0)
    partial = build_comparison([r for r in runs[:-1] if r.name not in {"baseline200", "baseline201", "baseline202"}],
                               baseline="method=baseline")
    assert {k: v.label if v else None for k, v in partial.base.items()} == {
        "method=baseline noise=0": None, "method=avw noise=0": "method=baseline noise=0", "method=avw noise=20": None}
    # a full label names one baseline for everyone
    one = baselines(comp.groups, "method=baseline noise=0")
    assert {v.label for v in one.values() if v} == {"method=baseline noise=0"}
    # a run names its group
    assert baselines(comp.groups, "avw01")["method=baseline noise=0"].label == "method=avw noise=0"
    warned = build_comparison(runs)
    assert len(warned.warnings) == 1 and "train.max_iter (10 / 20)" in warned.warnings[0]


def test_bad_baseline_and_a_seed_twice_are_errors():
    runs = _method_runs()
    with pytest.raises(ConfigError, match=r"--baseline 'weighting.name=rlo': no group .*weighting.name=equal"):
        build_comparison(runs, baseline="weighting.name=rlo")
    with pytest.raises(ConfigError, match="the same config and seed 0 twice"):
        group_runs([*runs, _run("again", 0, 3.0, {"weighting.name": "equal"})])


def test_final_sigmas_reads_both_log_formats():
    rec = {"iter": 5, "log_var_cls": 0.0, "log_var_reg": 1.0, "log_var_out_of_range": {"reg": 9.0},
           "loss/log_var/roi_cls": -2.0, "loss": 3.0}
    assert final_sigmas(rec) == pytest.approx({"cls": 1.0, "reg": math.exp(0.5), "roi_cls": math.exp(-1.0)})


def test_plots_on_made_up_runs(tmp_path):
    runs = []
    for method, gain in (("baseline", 0.0), ("avw", 1.0), ("rlo", 2.0)):
        for noise in ("0", "20"):
            for seed in (0, 1, 2):
                evals = [(it, {"AP": gain + it / 100 + seed * 0.1}) for it in (100, 200, 300)]
                runs.append(_run(f"{method}{noise}{seed}", seed, evals[-1][1]["AP"], {"m": method, "n": noise},
                                 {"method": method, "noise": noise}, ("m", "n"), evals))
    comp = build_comparison(runs, baseline="method=baseline")
    files = plot_comparison(comp.groups, tmp_path / "two_axes", comp.base)
    assert [f.name for f in files] == ["AP_vs_iter.png", "final_AP.png", "AP_difference.png"]
    one_axis = build_comparison([r for r in runs if r.labels["noise"] == "0"])
    files = plot_comparison(one_axis.groups, tmp_path / "one_axis")
    assert [f.name for f in files] == ["AP_vs_iter.png", "final_AP.png"]
    for f in [*(tmp_path / "two_axes").iterdir(), *files]:
        assert f.stat().st_size > 10_000, f


def _fake_run_dir(path, seed, weighting, ap, max_iter=1000):
    path.mkdir()
    cfg = config_from_dict({"seed": seed, "weighting": {"name": weighting}, "train": {"max_iter": max_iter}})
    (path / "config.yaml").write_text(config_to_yaml(cfg))
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    (path / "metrics.json").write_text(json.dumps({"bbox": {k: ap for k in names}, "iter": max_iter}))
    (path / "log.jsonl").write_text(json.dumps({"iter": max_iter, "log_var_cls": 0.0}) + "\n")
    (path / "eval.jsonl").write_text(json.dumps({"iter": max_iter, "bbox": {k: ap for k in names}}) + "\n")


def test_compare_cli_plain_table_and_grouped_statistics(tmp_path, capsys):
    # one run per setting: today's side-by-side table, and a warning for the other iteration count
    _fake_run_dir(tmp_path / "eq", 0, "equal", 10.0)
    _fake_run_dir(tmp_path / "avw", 0, "avw", 11.0, max_iter=900)
    assert main(["compare", str(tmp_path / "eq"), str(tmp_path / "avw")]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split() == ["run", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "notes"]
    assert "σ_cls=1.000" in out.out
    assert "warning: the runs differ in more than loss., weighting. and the seed: train.max_iter (1000 / 900)" \
        in out.err
    # three seeds each: grouped, with the paired difference
    dirs = []
    for s in (0, 1, 2):
        for w, aps in (("equal", BASE_AP), ("avw", AVW_AP)):
            d = tmp_path / f"{w}_s{s}"
            _fake_run_dir(d, s, w, aps[s])
            dirs.append(str(d))
    assert main(["compare", *dirs, "--baseline", "weighting.name=equal", "--metrics", "AP"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = out.out.splitlines()
    assert any(line.split()[:5] == ["weighting.name=equal", "3", "0,1,2", "11.00", "±"] for line in lines)
    row = next(line for line in lines if line.startswith("weighting.name=avw  weighting.name=equal"))
    half = T_975_DF2 * math.sqrt(7) / 6
    assert row.split()[2:] == ["3", "+1.67", f"[{5 / 3 - half:+.2f},", f"{5 / 3 + half:+.2f}]"]
    assert main(["compare", *dirs, "--baseline", "nosuch=1"]) == 2
    assert "--baseline 'nosuch=1': no group" in capsys.readouterr().err
    # a metric name with a typo is an error naming the option, not a column of dashes
    assert main(["compare", *dirs, "--metrics", "AP,AP5O"]) == 2
    assert "compare --metrics: unknown metric AP5O; one of AP, AP50" in capsys.readouterr().err
    assert main(["compare", *dirs, "--plot", str(tmp_path / "p"), "--plot-metrics", "ap"]) == 2
    assert "compare --plot-metrics: unknown metric ap" in capsys.readouterr().err
    assert main(["compare", *dirs, "--plot-metrics", "AP50"]) == 2
    assert "--plot-metrics needs --plot DIR" in capsys.readouterr().err
    # a config.yaml that is not YAML: one line, exit 2
    (tmp_path / "eq" / "config.yaml").write_text("seed: [0\n")
    assert main(["compare", str(tmp_path / "eq"), str(tmp_path / "avw")]) == 2
    assert "config.yaml: not valid YAML" in capsys.readouterr().err


def test_settings_of_a_switch_that_is_off_are_not_part_of_a_result():
    from robustdet.runs.settings import result_config

    off = {"model": {"box_uncertainty": False}, "loss": {"box_uncertainty_form": "kl", "box_uncertainty_warmup": 0}}
    other = {"model": {"box_uncertainty": False}, "loss": {"box_uncertainty_form": "isolated"}}
    assert result_config(off) == result_config(other) == {"model.box_uncertainty": False}
    on = {"model": {"box_uncertainty": True}, "loss": {"box_uncertainty_form": "kl"}}
    assert result_config(on) == {"model.box_uncertainty": True, "loss.box_uncertainty_form": "kl"}
    assert result_config({"loss": {"box_uncertainty_form": "kl", "beta": 0.1}}) == {"loss.beta": 0.1}
