#!/usr/bin/env bash
# Writes issue 17's committed results anew from the runs in runs/robust/ (docs/results.md quotes them): the
# summary, the compare table (mean ± std per cell, paired differences to the baseline at the same noise and
# seed), the recovery table (recovery.py: the share of the baseline's loss to each kind that each method wins
# back, with its paired 95 % interval, and its cost on clean labels) and the AP plots; and the selection
# runs' table (select.yaml, runs/robust-select) where they exist.
#   experiments/robust/report.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
R=.venv/bin/robustdet
PY=.venv/bin/python
E=experiments/robust
cp runs/robust/summary.csv $E/summary.csv
# the unfinished cells' lines are the sweep's state, not a result
$R compare runs/robust --baseline method=baseline --metrics AP,AP50,AP75,APs,APm --plot $E/plots \
    --plot-metrics AP,AP50 | grep -v "not finished" > $E/compare.txt
$PY $E/recovery.py $E/summary.csv > $E/recovery.txt
if [ -d runs/robust-select ]; then
    cp runs/robust-select/summary.csv $E/select_summary.csv
    $R compare runs/robust-select --baseline method=baseline --metrics AP,AP50,AP75 \
        | grep -v "not finished" > $E/select_compare.txt
fi
git status --short $E
