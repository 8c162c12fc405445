"""``robustdet sweep --executor local|slurm`` (submitit): each cell one job, a rerun skips finished cells, bad
options are one line; the SLURM options as the sbatch file gets them (no SLURM here: a stand-in sbatch/srun)."""

import json

import pytest

from robustdet.cli import main
from tests.conftest import REPO, tiny_overrides

CONFIG = str(REPO / "configs" / "default.yaml")
NAMES = [f"weighting.name={w}__seed=0" for w in ("equal", "avw")]


def _tiny(tmp_path):
    extra = {"train.max_iter": 2, "checkpoint.period": 1, "log.tensorboard": "false", "eval.max_images": 3,
             "weighting.interval": 2}
    return tiny_overrides(tmp_path, extra)


def _job_logs(out):
    return [p.read_text() for p in (out / "submitit").rglob("*_log.out")]


@pytest.mark.slow
def test_executor_local_trains_each_cell_once_and_a_rerun_skips_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    argv = ["sweep", CONFIG, "--grid", "weighting.name=equal,avw", "--seeds", "0", "--out", str(out),
            "--executor", "local", "--jobs", "2", *_tiny(tmp_path)]
    assert main(argv) == 0
    logs = _job_logs(out)
    assert len(logs) == 2
    for name in NAMES:  # one job each, trained once, never resumed
        assert sum(log.count(f"[job] {name}: training") for log in logs) == 1, name
        assert json.loads((out / name / "cell.json").read_text())["status"] == "done"
        assert (out / name / "metrics.json").exists()
    stamps = {n: (out / n / "metrics.json").stat().st_mtime_ns for n in NAMES}
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"{n}: done, skipped" in printed for n in NAMES)
    assert len(_job_logs(out)) == 2  # nothing submitted
    assert {n: (out / n / "metrics.json").stat().st_mtime_ns for n in NAMES} == stamps


def test_bad_executor_options_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    out = tmp_path / "sweep"
    base = ["sweep", CONFIG, "--grid", "weighting.name=equal,avw", "--out", str(out), *_tiny(tmp_path)]
    cases = [
        (["--executor", "local", "--slurm", "partiton=gpu"], "--slurm partiton=gpu: unknown key (one of partition,"),
        (["--executor", "local", "--slurm", "timeout_min=soon"], "--slurm timeout_min=soon: Input should be a valid"),
        (["--executor", "local", "--slurm", "gpu"], "--slurm 'gpu' is not of the form KEY=VALUE"),
        (["--slurm", "partition=gpu"], "--slurm partition=gpu: needs --executor slurm (or local)"),
        (["--executor", "local", "--jobs", "0"], "--jobs 0: must be at least 1"),
        (["--executor", "slurm"], "--executor slurm: no sbatch on this machine's PATH"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {CONFIG}\ngrid: {{weighting.name: [equal]}}\nslurm: {{partiton: gpu}}\n")
    assert main(["sweep", str(sweep), "--out", str(out), "--executor", "local", *_tiny(tmp_path)]) == 2
    assert f"{sweep}: slurm.partiton: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--executor", "cloud"])


def test_slurm_options_reach_the_sbatch_file(tmp_path, monkeypatch):
    from robustdet.runs.submit import make_executor, slurm_options

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):  # submitit's SlurmExecutor looks for them; nothing is submitted
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    options = slurm_options({"partition": "gpu", "timeout_min": 240, "max_num_timeout": 5},
                            ["gpus_per_node=2", "cpus_per_task=8", "setup=[module load cuda]"], "sweep.yaml")
    ex = make_executor("slurm", tmp_path / "submitit", options, "robustdet-x")
    text = ex._executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --job-name=robustdet-x", "module load cuda"):
        assert line in text, line
    assert ex._executor.max_num_timeout == 5
