"""The CLI end to end on tiny synthetic data: train, resume, eval, predict, report, compare, errors."""

import json
import shutil

import pytest
import torch

from robustdet.cli import main
from tests.conftest import REPO, same_state, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")


def _train(tmp_path, out, extra=None, *flags):
    argv = ["train", CONFIG, *tiny_overrides(tmp_path, extra), "--out", str(out), *flags]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    run = tmp / "run"
    _train(tmp, run, {"train.max_iter": 6, "checkpoint.period": 3, "weighting.interval": 2})
    return tmp, run


def test_train_writes_a_complete_run_directory(trained_run):
    _, run = trained_run
    for name in ("config.yaml", "log.jsonl", "metrics.json", "checkpoints/last.pt", "checkpoints/prev.pt"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4, 5, 6]
    last = records[-1]
    probabilities = [f"weighting/action_probability/{a}" for a in ("a0_avw", "a1_smallest_loss",
                                                                     "a2_largest_loss", "a3_equal")]
    for key in ("iter", "lr", "loss", "level_losses", "level_weights", "level_plain_losses", "weighting/action",
                "weighting/variance_rate", "loss/log_var/cls", "loss/log_var/reg", "loss/sigma/cls", *probabilities):
        assert key in last, key
    assert len(last["level_losses"]) == len(last["level_weights"]) == len(last["level_plain_losses"]) == 5
    assert sum(last[k] for k in probabilities) == pytest.approx(1.0)
    # RLO with interval 2: the first window closes after iteration 2, so an action is in force by then
    assert records[0]["weighting/action"] == -1 and last["weighting/action"] in (0, 1, 2, 3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                                    "ARs", "ARm", "ARl"}
    assert len(metrics["per_class"]) == 5


def test_resume_from_previous_checkpoint_is_bitwise_exact(trained_run):
    tmp, run = trained_run
    resumed = tmp / "resumed"
    shutil.copytree(run, resumed)
    (resumed / "checkpoints" / "last.pt").unlink()  # as if killed after the checkpoint at iteration 3
    _train(tmp, resumed, {"train.max_iter": 6, "checkpoint.period": 3, "weighting.interval": 2}, "--resume")
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for key in ("weighting", "optimizer", "scheduler", "rng"):
        assert same_state(a[key], b[key]), key
    log_a = (run / "log.jsonl").read_text().splitlines()
    log_b = (resumed / "log.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "time"} for x in log_a]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "time"} for x in log_b]


def test_resume_ignores_the_settings_of_a_switch_that_is_off(trained_run, capsys):
    """A checkpoint written before a default of loss.box_uncertainty_* changed resumes when
    model.box_uncertainty is off (found on a sweep cell of stop 24); any other model/loss change is refused."""
    tmp, run = trained_run
    extra = {"train.max_iter": 6, "checkpoint.period": 3, "weighting.interval": 2}
    for name, change, code in (("old_default", {"box_uncertainty_form": "kl"}, 0), ("other_loss", {"beta": 0.5}, 2)):
        resumed = tmp / name
        shutil.copytree(run, resumed)
        (resumed / "checkpoints" / "last.pt").unlink()
        prev = resumed / "checkpoints" / "prev.pt"
        state = torch.load(prev, weights_only=True)
        state["config"]["loss"].update(change)
        torch.save(state, prev)
        argv = ["train", CONFIG, *tiny_overrides(tmp, extra), "--out", str(resumed), "--resume"]
        assert main(argv) == code, name
        if code == 0:
            a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
            b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
            assert all(torch.equal(v, b[k]) for k, v in a.items())
        else:
            assert "model/loss config of" in capsys.readouterr().err


def test_eval_predict_report_compare(trained_run, tmp_path, capsys):
    tmp, run = trained_run
    ckpt = str(run / "checkpoints" / "last.pt")
    out_json = tmp_path / "m.json"
    assert main(["eval", ckpt, "--out", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["bbox"] == json.loads((run / "metrics.json").read_text())["bbox"]
    images = sorted((tmp / "cache").rglob("val/*.png"))[:2]
    assert len(images) == 2
    assert main(["predict", ckpt, *map(str, images), "--out", str(tmp_path / "pred"), "--score-thresh", "0"]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert all(d["label"] for p in preds for d in p["detections"])
    assert main(["report", str(run)]) == 0
    for name in ("loss.png", "level_losses.png", "level_weights.png", "weighting_action_probability.png",
                 "loss_sigma.png", "loss_log_var.png", "weighting_variance_rate.png", "level_plain_losses.png",
                 "metrics.md"):
        assert (run / "report" / name).stat().st_size > 0, name
    capsys.readouterr()
    assert main(["compare", str(run), str(run)]) == 0
    table = capsys.readouterr().out
    assert "AP50" in table and "σ_cls" in table


def test_existing_run_is_not_overwritten(trained_run, capsys):
    tmp, run = trained_run
    code = main(["train", CONFIG, *tiny_overrides(tmp), "--out", str(run)])
    assert code == 2
    assert "use --resume" in capsys.readouterr().err


def test_bad_override_exits_2_without_traceback(tmp_path, capsys):
    # in this process: the command's exit code and stderr are main()'s (test_robustness.py runs
    # `python -m robustdet` itself); a child would spend 4 s importing torch to print one line
    assert main(["train", CONFIG, "weighting.intervall=3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "weighting.intervall: unknown key" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("bayesian", "weighting"), [("false", "equal"), ("true", "equal"), ("false", "avw"), ("false", "rlo")]
)
def test_retinanet_every_method_trains_and_logs_its_fields(tmp_path, bayesian, weighting):
    # bayesian + rlo is the module's trained_run; the other four methods, two iterations each
    run = tmp_path / "run"
    extra = {"train.max_iter": 2, "loss.bayesian": bayesian, "weighting.name": weighting,
             "weighting.interval": None if weighting == "equal" else 2, "checkpoint.period": 0}
    _train(tmp_path, run, extra)
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert ("loss/log_var/cls" in last) == (bayesian == "true")
    assert ("weighting/action" in last) == (weighting == "rlo")
    assert all(v == v for v in last["level_losses"])  # finite, not NaN
    assert (run / "metrics.json").exists()
