#!/usr/bin/env bash
# Writes issue 10's committed results anew from the runs in runs/noise/ (docs/results.md quotes them):
# the grid's (and the ablation's) summary, the compare tables and plots, and the σ tables and plots of the
# grid, of the two converged-s runs and of the σ sweep (each where its runs exist), and the σ sweep's
# detectors evaluated with no score threshold (rank_check.sh; it adds eval_thresh0.json to each σ cell,
# nothing else in the runs is touched).
#   experiments/noise/report.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
R=.venv/bin/robustdet
PY=.venv/bin/python
E=experiments/noise
cp runs/noise/grid/summary.csv $E/summary.csv
if [ -f runs/noise/ablation/summary.csv ]; then cp runs/noise/ablation/summary.csv $E/ablation_summary.csv; fi
# the unfinished cells' lines are the sweep's state, not a result
$R compare runs/noise/grid --baseline method=baseline --metrics AP,AP50,AP75,APs,APm --plot $E/plots \
    --plot-metrics AP,AP50 \
    | grep -v "not finished" > $E/compare.txt
if [ -d runs/noise/ablation ]; then  # the controls against the grid's clean baseline and Bayesian runs
    $R compare runs/noise/grid/method=baseline__noise=0__* runs/noise/grid/method=bayesian__noise=0__* \
        runs/noise/ablation --baseline method=baseline --metrics AP,AP50,AP75 \
        | grep -v "^note" > $E/ablation_compare.txt
fi
$PY $E/sigma_study.py runs/noise/grid --out $E/grid_sigma > $E/grid_sigma/sigma_study.txt
if [ -d runs/noise/converged ]; then
    $PY $E/sigma_study.py runs/noise/converged --out $E/converged > $E/converged/sigma_study.txt
fi
if [ -d runs/noise/sigma ]; then
    $PY $E/sigma_study.py runs/noise/sigma --out $E > $E/sigma_study.txt
    $E/rank_check.sh runs/noise/sigma > $E/sigma_thresh0.md
fi
git status --short $E
