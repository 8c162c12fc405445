"""Issue 17's sweep files (experiments/robust/): the benchmark's cells, the selection runs kept apart from them,
every ``--only`` of run.sh naming levels that exist, and recovery.py on made-up numbers."""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys

import pytest

from robustdet.runs.sweep_spec import build_cells, load_sweep_file, select_cells
from tests.conftest import REPO

E = REPO / "experiments" / "robust"
METHODS = ["baseline", "bayesian", "box_uncertainty", "box_uncertainty+voting", "box_uncertainty+warmup",
           "box_uncertainty_detached", "box_uncertainty_detached+voting", "box_uncertainty_isolated",
           "bootstrap", "label_smoothing", "gce", "brl", "best"]
NOISE = ["clean", "jitter40", "flip40", "drop40", "jitter20", "flip20", "drop20"]
def test_benchmark_has_every_method_and_kind():
    spec = load_sweep_file(E / "robust.yaml")
    assert spec.seeds == [0, 1, 2]
    assert [(a.name, [lab for lab, _ in a.levels]) for a in spec.axes] == [("method", METHODS), ("noise", NOISE)]
    cells = build_cells(spec)  # every row builds: a key that does not exist fails here, no row is left out
    assert len(cells) == len(METHODS) * len(NOISE) * 3
    by = {(c.labels["method"], c.labels["noise"], c.seed): c.cfg for c in cells}
    rates = {n: by[("baseline", n, 0)].data.train.label_noise for n in NOISE}
    for n, r in rates.items():
        kind, level = (re.fullmatch(r"([a-z]+)(\d+)", n).groups() if n != "clean" else ("", "0"))
        want = {"jitter": (float(level) / 100, 0.0, 0.0), "flip": (0.0, float(level) / 100, 0.0),
                "drop": (0.0, 0.0, float(level) / 100), "": (0.0, 0.0, 0.0)}[kind]
        assert (r.box_jitter, r.class_flip, r.drop, r.spurious, r.flip_mode) == (*want, 0.0, "uniform"), n
    base = by[("baseline", "flip40", 1)]
    assert (base.loss.bayesian, base.weighting.name, base.loss.noisy_label_switches()) == (False, "equal", [])
    assert (base.data.synthetic.image_size, base.data.synthetic.num_classes, base.train.max_iter) == (96, 3, 1000)
    assert by[("bayesian", "clean", 0)].loss.bayesian
    assert by[("bootstrap", "flip40", 0)].loss.noisy_label_switches() == ["loss.cls_method=bootstrap"]
    assert by[("brl", "drop40", 2)].loss.noisy_label_switches() == ["loss.brl=true"]
    assert by[("best", "flip40", 0)].loss.noisy_label_switches() == ["loss.cls_method=bootstrap", "loss.brl=true"]
    voted = by[("box_uncertainty_detached+voting", "jitter40", 0)]
    assert (voted.model.box_uncertainty, voted.model.var_voting, voted.loss.box_uncertainty_form) == (
        True, True, "detached")
    isolated = by[("box_uncertainty_isolated", "clean", 1)]
    assert (isolated.model.box_uncertainty, isolated.model.var_voting, isolated.loss.box_uncertainty_form) == (
        True, False, "isolated")
    # the method cells differ from the baseline's only in the method's own keys
    for m in ("label_smoothing", "gce", "brl"):
        a, b = by[(m, "drop40", 0)].model_dump(), base.model_copy(update={"seed": 0}).model_dump()
        b["data"]["train"]["label_noise"] = a["data"]["train"]["label_noise"]
        assert a["model"] == b["model"] and a["train"] == b["train"] and a["data"] == b["data"]


def test_selection_runs_are_apart_from_the_reported_ones():
    sel = build_cells(load_sweep_file(E / "select.yaml"))
    reported = build_cells(load_sweep_file(E / "robust.yaml"))
    assert len(reported) == len(METHODS) * len(NOISE) * 3
    assert len(sel) == 11 * 3 and {c.seed for c in sel} == {100}
    assert not {c.seed for c in sel} & {c.seed for c in reported}
    # another generated dataset (train and validation split), and other noise draws
    assert {c.cfg.data.synthetic.seed for c in sel} == {100} and {c.cfg.data.synthetic.seed for c in reported} == {0}
    assert {c.cfg.data.train.label_noise.seed for c in sel} == {100}
    tried = {c.labels["method"]: c.cfg.loss for c in sel}
    assert [tried[f"bootstrap{b}"].bootstrap_beta for b in ("0.8", "0.95")] == [0.8, 0.95]
    assert [tried[f"brl{t}"].brl_threshold for t in ("0.1", "0.2", "0.3", "0.5")] == [0.1, 0.2, 0.3, 0.5]
    # the selection cell is the benchmark's otherwise
    a = next(c.cfg for c in sel if c.labels == {"method": "baseline", "noise": "flip40"})
    b = next(c.cfg for c in reported if c.labels == {"method": "baseline", "noise": "flip40"} and c.seed == 0)
    assert a.model == b.model and a.train == b.train and a.loss == b.loss


def only_args(script: str) -> list[list[str]]:
    """The ``--only`` arguments of each sweep command of a run script, with $BEST as one method."""
    runs = []
    for line in (E / script).read_text().splitlines():
        words = shlex.split(line.replace('"$BEST"', "gce").replace('"$@"', ""), comments=True)
        if "sweep" in words:
            runs.append([words[i + 1] for i, w in enumerate(words) if w == "--only"])
    return runs


def test_run_sh_names_existing_levels_and_covers_the_40_percent_cells_first():
    spec = load_sweep_file(E / "robust.yaml")
    cells = build_cells(spec)
    runs = only_args("run.sh")
    assert len(runs) == 9
    seen: list[str] = []
    for only in runs:
        seen += [c.name for c in select_cells(cells, spec, only) if c.name not in seen]
    at_20 = [i for i, n in enumerate(seen) if re.search(r"noise=(jitter|flip|drop)20_", n)]
    forty = {c.name for c in cells if not re.search(r"noise=\w+20_", c.name)}
    # every clean and 40 % cell, all of them before any 20 % one; the 20 % ones for baseline and BEST only
    assert set(seen[: min(at_20)]) == forty
    assert {seen[i].split("__")[0] for i in at_20} == {"method=baseline", "method=gce"}


def test_recovery_table_on_made_up_runs(tmp_path):
    rows = []
    ap = {("baseline", "clean"): [30, 32, 31], ("baseline", "flip40"): [20, 21, 22],
          ("gce", "clean"): [29.5, 31.5, 30.5], ("gce", "flip40"): [25, 25.5, 26.5],
          ("brl", "clean"): [27, 29, 28], ("brl", "flip40"): [20.5, 21, 22]}
    for (m, n), values in ap.items():
        for s, v in enumerate(values):
            rows.append({"method": m, "noise": n, "seed": s, "status": "done", "AP": v})
    path = tmp_path / "summary.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "noise", "seed", "status", "AP"])
        w.writeheader()
        w.writerows(rows)
    out = subprocess.run([sys.executable, str(E / "recovery.py"), str(path)], capture_output=True, text=True,
                         check=True).stdout
    lines = {line.split()[2]: line for line in out.splitlines() if line.startswith("flip40")}
    # baseline loss: mean(10, 11, 9) = 10; gce wins back d = (5, 4.5, 4.5), mean 4.667: 46.7 %, cost 0.5: met
    assert "10.00" in lines["gce"] and "+46.7 %" in lines["gce"] and lines["gce"].endswith("met")
    # brl: d = (0.5, 0, 0), 1.7 %, cost 3: not met
    assert "+1.7 %" in lines["brl"] and "3.00" in lines["brl"] and "short by 38.3 pts" in lines["brl"]


@pytest.mark.parametrize("script", ["run.sh", "report.sh"])
def test_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", str(E / script)], check=True)


def test_archive_keeps_the_compared_files_and_merges_the_summaries(tmp_path):
    runs, dest = tmp_path / "runs", tmp_path / "dest"
    fields = ["cell", "method", "noise", "seed", "status", "AP"]

    def write(path, rows, names=fields):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            w.writerows(rows)

    # committed: a lost cell (a) and one being rerun (b); the sweep: b still running, then c done
    write(dest / "summary.csv", [["a", "baseline", "clean", 0, "done", 30.0], ["b", "gce", "clean", 0, "done", 29.0]])
    write(runs / "summary.csv", [["b", "gce", "clean", 0, "running", ""], ["c", "brl", "clean", 0, "done", 28.0]],
          fields)
    for name, finished in (("b", False), ("c", True)):
        cell = runs / name
        cell.mkdir()
        (cell / "cell.json").write_text('{"labels": {"method": "x"}}')
        (cell / "config.yaml").write_text("seed: 0\n")
        (cell / "checkpoint.pt").write_bytes(b"big")
        (cell / "log.jsonl").write_text('{"iter": 1, "loss": 2}\n{"iter": 2, "loss": 1}\n{"event": "end"}\n')
        if finished:
            (cell / "metrics.json").write_text('{"bbox": {"AP": 28.0}}')
    subprocess.run([sys.executable, str(E / "archive.py"), str(runs), str(dest)], check=True, capture_output=True)
    assert sorted(p.name for p in (dest / "cells").iterdir()) == ["c", "summary.csv"]
    kept = dest / "cells" / "c"
    assert sorted(p.name for p in kept.iterdir()) == ["cell.json", "config.yaml", "log.jsonl", "metrics.json"]
    assert (kept / "log.jsonl").read_text() == '{"iter": 2, "loss": 1}\n'
    with (dest / "summary.csv").open() as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert [(k, r["status"], r["AP"]) for k, r in rows.items()] == [
        ("a", "done", "30.0"), ("b", "done", "29.0"), ("c", "done", "28.0")]
