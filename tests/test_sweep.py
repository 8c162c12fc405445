"""``robustdet sweep``: the grid, the sweep file, cell names, --dry-run, a 2 x 2 x 1 sweep through the CLI
(summary.csv, compare), resuming a sweep whose cells were cut short, and sweep processes sharing a directory."""

import csv
import json
import math
import re
import shutil

import pytest
import torch

from robustdet.cli import main
from robustdet.engine.evaluator import METRIC_NAMES
from robustdet.errors import ConfigError
from robustdet.runs.sweep_spec import (
    build_cells,
    load_sweep_file,
    parse_grid_arg,
    parse_seeds,
    safe_name,
    spec_from_args,
)
from tests.conftest import REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")
GRID = ["--grid", "weighting.name=equal,avw", "--grid", "loss.bayesian=true", "--seeds", "0,1"]
NAMES = [f"weighting.name={w}__loss.bayesian=true__seed={s}" for s in (0, 1) for w in ("equal", "avw")]


def _tiny(tmp_path):
    extra = {"train.max_iter": 2, "checkpoint.period": 1, "log.tensorboard": "false", "eval.max_images": 3,
             "weighting.interval": 2}
    return tiny_overrides(tmp_path, extra)


def test_grid_values_parse_like_override_values():
    axis = parse_grid_arg("model.anchor_sizes=[8, 16, 32, 64, 128],[4, 8, 16, 32, 64]")
    assert axis.name == "model.anchor_sizes"
    assert [o for _, o in axis.levels] == [{"model.anchor_sizes": [8, 16, 32, 64, 128]},
                                          {"model.anchor_sizes": [4, 8, 16, 32, 64]}]
    axis = parse_grid_arg("loss.bayesian=true,false")
    assert [(lab, o["loss.bayesian"]) for lab, o in axis.levels] == [("true", True), ("false", False)]
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("weighting.name", "=a,b", "x..y=1", "weighting.name=avw,,rlo"):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid_arg(bad)
    with pytest.raises(ConfigError, match="--seeds 'a,b'"):
        parse_seeds("a,b")


def test_cell_names_are_safe_folder_names():
    assert safe_name("method=bayesian+rlo") == "method=bayesian+rlo"
    assert safe_name("model.anchor_sizes=[8, 16]") == "model.anchor_sizes=_8_16"
    assert safe_name("data.path=../x/y.json") == "data.path=.._x_y.json"  # no "/" left
    assert safe_name("..") == "_"


def _write_sweep(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_sweep_file_builds_labelled_cells(tmp_path):
    path = _write_sweep(tmp_path, f"""
config: {CONFIG}
overrides: {{train.max_iter: 3, data.synthetic.cache_dir: {tmp_path}}}
seeds: [0, 1]
grid:
  method:
    baseline: {{loss.bayesian: false, weighting.name: avw}}
    bayesian+rlo: {{loss.bayesian: true, weighting.name: rlo}}
  weighting.interval: [10, 20]
""")
    cells = build_cells(load_sweep_file(path))
    assert len(cells) == 8
    assert cells[0].name == "method=baseline__weighting.interval=10__seed=0"
    assert cells[-1].name == "method=bayesian+rlo__weighting.interval=20__seed=1"
    last = cells[-1].cfg
    assert (last.seed, last.loss.bayesian, last.weighting.name, last.weighting.interval) == (1, True, "rlo", 20)
    assert all(c.cfg.train.max_iter == 3 for c in cells)
    assert cells[-1].labels == {"method": "bayesian+rlo", "weighting.interval": "20"}
    # the command line's overrides, axes and seeds go on top of the file's
    spec = spec_from_args(str(path), ["train.max_iter=5"], ["model.backbone=resnet18,resnet34"], "3")
    cells = build_cells(spec)
    assert len(cells) == 8 and {c.seed for c in cells} == {3} and cells[0].cfg.train.max_iter == 5


def test_issue10_sweep_files_are_the_whole_experiment():
    spec = load_sweep_file(REPO / "experiments" / "noise" / "grid.yaml")
    assert spec.seeds == [0, 1, 2]
    assert [(a.name, [lab for lab, _ in a.levels]) for a in spec.axes] == [
        ("method", ["baseline", "bayesian", "avw", "rlo", "bayesian+rlo", "uw", "dwa"]),
        ("noise", ["0", "40"]),  # the 20 % level dropped to fit the time (docs/results.md)
    ]
    assert dict(spec.axes[0].levels)["bayesian+rlo"] == {"loss.bayesian": True, "weighting.name": "rlo"}
    assert all(len(o) >= 2 for a in spec.axes for _, o in a.levels)
    cells = build_cells(spec)
    noisy = next(c for c in cells if c.labels == {"method": "uw", "noise": "40"}).cfg
    assert (noisy.data.train.label_noise.class_flip, noisy.data.train.label_noise.drop) == (0.4, 0.2)

    sigma = build_cells(load_sweep_file(REPO / "experiments" / "noise" / "sigma.yaml"))
    assert len(sigma) == 18 and all(c.cfg.loss.bayesian and c.cfg.weighting.name == "equal" for c in sigma)
    noise = {c.labels["noise"]: c.cfg.data.train.label_noise for c in sigma}
    assert [noise[f"jitter{k}"].box_jitter for k in (10, 20, 30, 40)] == [0.1, 0.2, 0.3, 0.4]
    assert all(noise[f"flip{k}"].box_jitter == 0.0 and noise[f"jitter{k}"].class_flip == 0.0 for k in (10, 40))
    # the grid's cell size: the σ study's clean runs are the grid's method=bayesian noise=0 setting with the
    # log-variances at their own lr (converged s), the grid's at the model's (as shipped)
    base = {c.labels["method"]: c.cfg for c in cells if c.labels["noise"] == "0" and c.seed == 0}["bayesian"]
    assert (base.train.optimizer.log_var_lr, sigma[0].cfg.train.optimizer.log_var_lr) == (None, 0.02)
    same_lr = base.model_copy(update={"train": base.train.model_copy(update={
        "optimizer": base.train.optimizer.model_copy(update={"log_var_lr": 0.02})})})
    assert sigma[0].cfg.model_dump() == same_lr.model_dump()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config: x.yaml\n", "config: .*x.yaml does not exist"),
        ("grid: {{a: [1]}}\n", "config: missing"),
        ("config: {cfg}\nseeds: [0, a]\n", "seeds: must be a list of integers"),
        ("config: {cfg}\ngird: {{}}\n", "gird: unknown key"),
        ("config: {cfg}\ngrid: {{m: {{x: 3}}}}\n", r"grid.m.x: must be a mapping of dotted keys"),
        ("config: {cfg}\ngrid: {{m: 3}}\n", "grid.m: must be a list of values"),
        ("config: {cfg}\ngrid: {{a: {{x: {{weighting.name: avw}}}}, weighting.name: [rlo]}}\n",
         "grid axes 'a' and 'weighting.name' both set weighting.name"),
        ("config: {cfg}\ngrid: {{seed: [1, 2]}}\n", "grid axis 'seed'"),
        ("config: {cfg}\ngrid: {{m: {{x: {{weighting.intervall: 3}}}}}}\n",
         "cell m=x: .*weighting.intervall: unknown key"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, text, message):
    path = _write_sweep(tmp_path, text.format(cfg=CONFIG))
    with pytest.raises(ConfigError, match=message):
        build_cells(load_sweep_file(path))


def test_dry_run_lists_cells_and_iterations(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", CONFIG, *GRID, "--out", str(out), "--dry-run", "train.max_iter=7"]) == 0
    text = capsys.readouterr().out
    for name in NAMES:
        assert re.search(rf"^  {re.escape(name)} +7 iterations  \[new\]$", text, re.M), name
    assert "4 cells (2 x 1 grid x 2 seeds), 28 iterations in all; 0 done, 0 to resume, 4 to start" in text
    assert not out.exists()
    # an option between the overrides is still an error, with argparse's usual exit code
    with pytest.raises(SystemExit) as exc:
        main(["sweep", CONFIG, "--out", str(out), "a=1", "--bogus"])
    assert exc.value.code == 2


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "sweep"
    assert main(["sweep", CONFIG, *GRID, "--out", str(out), *_tiny(tmp)]) == 0
    return tmp, out


def _rows(out):
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_cells_and_summary(swept):
    _, out = swept
    rows = _rows(out)
    assert [r["cell"] for r in rows] == NAMES
    assert [(r["weighting.name"], r["loss.bayesian"], r["seed"]) for r in rows] == [
        ("equal", "true", "0"), ("avw", "true", "0"), ("equal", "true", "1"), ("avw", "true", "1")]
    for r in rows:
        cell = out / r["cell"]
        cfg = (cell / "config.yaml").read_text()
        assert f"seed: {r['seed']}" in cfg and f"name: {r['weighting.name']}" in cfg
        bbox = json.loads((cell / "metrics.json").read_text())["bbox"]
        assert {k: float(r[k]) for k in bbox} == pytest.approx(bbox, abs=1e-4)
        last = json.loads((cell / "log.jsonl").read_text().splitlines()[-1])
        assert float(r["sigma_cls"]) == pytest.approx(math.exp(last["loss/log_var/cls"] / 2), abs=1e-6)
        assert float(r["sigma_reg"]) == pytest.approx(math.exp(last["loss/log_var/reg"] / 2), abs=1e-6)
        assert r["status"] == "done" and float(r["wall_s"]) > 0 and r["resumed"] == "False"
        # the machine it trained on (engine/machine.py): CPU model, threads, torch version
        starts = json.loads((cell / "machine.json").read_text())["starts"]
        assert [s["start_iter"] for s in starts] == [0] and starts[0]["torch"] == torch.__version__
        assert r["machine"] == f"{starts[0]['cpu']}, {starts[0]['threads']} threads, torch {torch.__version__}"
        assert json.loads((cell / "cell.json").read_text())["labels"] == {
            "weighting.name": r["weighting.name"], "loss.bayesian": "true"}


def test_compare_a_sweep_directory(swept, capsys):
    tmp, out = swept
    capsys.readouterr()
    plots = tmp / "plots"
    assert main(["compare", str(out), "--baseline", "weighting.name=equal", "--plot", str(plots),
                 "--plot-metrics", "AP,AP50"]) == 0
    res = capsys.readouterr()
    assert res.err == ""  # the cells differ only in the grid's keys and the seed
    lines = res.out.splitlines()
    rows = _rows(out)
    for method in ("equal", "avw"):
        sig = [float(r["sigma_reg"]) for r in rows if r["weighting.name"] == method]
        line = next(x for x in lines if x.startswith(f"weighting.name={method} "))
        assert line.split()[1:3] == ["2", "0,1"]
        assert f"{sum(sig) / 2:.2f} ± {abs(sig[0] - sig[1]) / math.sqrt(2):.2f}" in line
    assert any(x.startswith("weighting.name=avw  weighting.name=equal  2 ") for x in lines)
    assert sorted(p.name for p in plots.iterdir()) == [
        "AP50_difference.png", "AP50_vs_iter.png", "AP_difference.png", "AP_vs_iter.png", "final_AP.png",
        "final_AP50.png"]


def test_a_sweep_resumes_and_skips_finished_cells(swept, capsys):
    tmp, done = swept
    out = tmp / "resumed"
    shutil.copytree(done, out)
    restart, resume = out / NAMES[1], out / NAMES[2]
    (restart / "metrics.json").unlink()
    shutil.rmtree(restart / "checkpoints")  # killed before its first checkpoint: trains again
    (resume / "metrics.json").unlink()
    (resume / "checkpoints" / "last.pt").unlink()  # killed after iteration 1: resumes from prev.pt
    finished = [out / NAMES[0], out / NAMES[3]]
    before = {p: (p / "metrics.json").stat().st_mtime_ns for p in finished}
    capsys.readouterr()
    assert main(["sweep", CONFIG, *GRID, "--out", str(out), "--dry-run", *_tiny(tmp)]) == 0
    plan = capsys.readouterr().out
    assert "2 done, 1 to resume, 1 to start (4 iterations at most)" in plan
    assert main(["sweep", CONFIG, *GRID, "--out", str(out), *_tiny(tmp)]) == 0
    log = capsys.readouterr().out
    assert f"[sweep 1/4] {NAMES[0]}: done, skipped" in log and f"[sweep 4/4] {NAMES[3]}: done, skipped" in log
    assert f"{NAMES[2]}: resuming" in log and f"{NAMES[1]}: training" in log
    assert {p: (p / "metrics.json").stat().st_mtime_ns for p in finished} == before
    assert [r["cell"] for r in _rows(out)] == NAMES
    assert [r["resumed"] for r in _rows(out)] == ["False", "False", "True", "False"]
    starts = json.loads((resume / "machine.json").read_text())["starts"]
    assert starts[0]["start_iter"] == 0 and starts[-1]["start_iter"] > 0  # a record per start
    # both cut cells end exactly where the uninterrupted sweep did
    for name in (NAMES[1], NAMES[2]):
        a = torch.load(done / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        b = torch.load(out / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(v, b[k]) for k, v in a.items()), name
        assert json.loads((done / name / "metrics.json").read_text()) == json.loads(
            (out / name / "metrics.json").read_text())


def test_a_cell_folder_with_another_config_is_refused(swept, capsys):
    tmp, out = swept
    before = (out / "summary.csv").read_text()
    code = main(["sweep", CONFIG, *GRID, "--out", str(out), *_tiny(tmp), "train.optimizer.lr=0.001"])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds a run with another config (train.optimizer.lr: 0.0005 there, 0.001 in the sweep)" in err
    assert (out / "summary.csv").read_text() == before


def test_a_cell_trained_before_an_option_existed_is_still_this_cells_run(swept, capsys):
    """A key added to the config since a cell ran (here train.optimizer.log_var_warmup and
    label_noise.box_jitter_classes, at their defaults) is missing from its config.yaml: still the same run."""
    tmp, done = swept
    out = tmp / "older"
    shutil.copytree(done, out)
    path = out / NAMES[0] / "config.yaml"
    text = path.read_text()
    older = "\n".join(x for x in text.splitlines() if "log_var_warmup:" not in x and "box_jitter_classes:" not in x)
    assert older != text
    path.write_text(older + "\n")
    capsys.readouterr()
    assert main(["sweep", CONFIG, *GRID, "--out", str(out), *_tiny(tmp)]) == 0
    assert f"[sweep 1/4] {NAMES[0]}: done, skipped" in capsys.readouterr().out


def test_a_diverged_cell_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    from robustdet.config import config_to_yaml
    from robustdet.engine import trainer

    class FakeTrainer:  # the sweep's bookkeeping only: avw "diverges", the others "finish"
        def __init__(self, cfg, out_dir, resume=False, console=None):
            self.cfg, self.out = cfg, out_dir

        def train(self):
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_to_yaml(self.cfg))
            if self.cfg.weighting.name == "avw":
                raise trainer.TrainingDiverged("non-finite loss at iteration 3")
            (self.out / "metrics.json").write_text(json.dumps({"bbox": dict.fromkeys(METRIC_NAMES, 1.0)}))
            return {}

    monkeypatch.setattr(trainer, "Trainer", FakeTrainer)
    out = tmp_path / "sweep"
    argv = ["sweep", CONFIG, *GRID, "--out", str(out), f"data.synthetic.cache_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"2 cells diverged ({NAMES[1]}, {NAMES[3]})" in err
    assert [(r["cell"], r["status"], r["AP"]) for r in _rows(out)] == [
        (NAMES[0], "done", "1.0"), (NAMES[1], "diverged", ""), (NAMES[2], "done", "1.0"), (NAMES[3], "diverged", "")]
    assert json.loads((out / NAMES[1] / "cell.json").read_text())["error"] == "non-finite loss at iteration 3"
    assert main(argv) == 2  # a rerun does not retry them, and says so
    assert f"{NAMES[1]}: diverged in an earlier sweep, skipped" in capsys.readouterr().out


def _fake_trainer(monkeypatch, trained: list[str]):
    from robustdet.config import config_to_yaml
    from robustdet.engine import trainer

    class FakeTrainer:  # the sweep's bookkeeping only: every cell "finishes" at once
        def __init__(self, cfg, out_dir, resume=False, console=None):
            self.cfg, self.out = cfg, out_dir

        def train(self):
            trained.append(self.out.name)
            (self.out / "config.yaml").write_text(config_to_yaml(self.cfg))
            (self.out / "metrics.json").write_text(json.dumps({"bbox": dict.fromkeys(METRIC_NAMES, 1.0)}))
            return {}

    monkeypatch.setattr(trainer, "Trainer", FakeTrainer)


def test_a_cell_another_sweep_process_holds_is_left_to_it(tmp_path, monkeypatch, capsys):
    from robustdet.runs.sweep import claimed

    trained: list[str] = []
    _fake_trainer(monkeypatch, trained)
    out = tmp_path / "sweep"
    argv = ["sweep", CONFIG, *GRID, "--out", str(out), f"data.synthetic.cache_dir={tmp_path}"]
    # a second open file holding the lock is what another process would hold (flock is per open file)
    with claimed(out / NAMES[2]) as mine:
        assert mine
        assert main(argv) == 0
    log = capsys.readouterr().out
    assert f"[sweep 3/4] {NAMES[2]}: running in another sweep process, skipped" in log
    assert "1 cells were left to the other sweep processes" in log
    assert trained == [NAMES[0], NAMES[1], NAMES[3]]
    assert [r["cell"] for r in _rows(out)] == [NAMES[0], NAMES[1], NAMES[3]]
    # the holder is gone (its lock went with it): the next sweep takes the cell, and only that one
    assert main(argv) == 0
    assert trained[3:] == [NAMES[2]]
    assert [r["cell"] for r in _rows(out)] == NAMES


def test_sweep_jobs_trains_each_cell_once_in_parallel_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's share; set here so the machine's cores do not matter
    out = tmp_path / "sweep"
    argv = ["sweep", CONFIG, "--grid", "weighting.name=equal,avw", "--grid", "loss.bayesian=true", "--seeds", "0,1",
            "--out", str(out), "--jobs", "2", *_tiny(tmp_path)]
    assert main(argv) == 0
    assert "2 sweep processes, 1 threads each" in capsys.readouterr().out
    assert [(r["cell"], r["status"]) for r in _rows(out)] == [(n, "done") for n in NAMES]
    logs = [(out / "jobs" / f"job{k}.log").read_text() for k in (0, 1)]
    for name in NAMES:  # trained by exactly one of the two processes, never resumed
        assert sum(log.count(f"{name}: training") for log in logs) == 1, name
        assert json.loads((out / name / "cell.json").read_text())["resumed"] is False
    assert main([*argv[:-len(_tiny(tmp_path)) - 2], "--jobs", "0", *_tiny(tmp_path)]) == 2
    assert "--jobs 0: must be at least 1" in capsys.readouterr().err


def test_only_trains_a_subset_first_and_the_whole_sweep_trains_the_rest(tmp_path, monkeypatch, capsys):
    trained: list[str] = []
    _fake_trainer(monkeypatch, trained)
    out = tmp_path / "sweep"
    argv = ["sweep", CONFIG, *GRID, "--out", str(out), f"data.synthetic.cache_dir={tmp_path}"]
    assert main([*argv, "--only", "weighting.name=avw", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert NAMES[1] in plan and NAMES[3] in plan and NAMES[0] not in plan and NAMES[2] not in plan
    assert main([*argv, "--only", "weighting.name=avw"]) == 0
    assert trained == [NAMES[1], NAMES[3]]
    assert [r["cell"] for r in _rows(out)] == [NAMES[1], NAMES[3]]
    assert main([*argv, "--only", "weighting.name=avw,equal", "--only", "loss.bayesian=true"]) == 0
    assert trained[2:] == [NAMES[0], NAMES[2]]  # the finished ones skipped
    assert [r["cell"] for r in _rows(out)] == NAMES
    capsys.readouterr()
    assert main([*argv, "--only", "weighting.name=rlo"]) == 2
    assert "--only 'weighting.name=rlo': 'rlo' is not a level of weighting.name (equal, avw)" in capsys.readouterr().err
    assert main([*argv, "--only", "method=x"]) == 2
    assert "not AXIS=LABEL[,LABEL] with an axis of the sweep (weighting.name, loss.bayesian)" in capsys.readouterr().err
