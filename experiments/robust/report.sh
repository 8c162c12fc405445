#!/usr/bin/env bash
# Writes issue 17's committed results anew (docs/results.md quotes them). archive.py first keeps the finished
# cells of runs/robust in experiments/robust/cells/ (the files compare reads; run folders do not outlive a
# session) and merges runs/robust/summary.csv into the committed summary.csv. Then, from those: the compare
# table (mean ± std per cell, paired differences to the baseline at the same noise and seed) and the AP
# plots of the archived cells; the recovery table (recovery.py, from summary.csv: every finished cell, the
# share of the baseline's loss to each kind that each method wins back, with its paired 95 % interval and
# its cost on clean labels); and the selection runs' table (select.yaml, runs/robust-select) where they
# exist. The cells of stop 23 and before are in summary.csv only (their folders were lost): their compare
# table and plots are compare_stop23.txt and plots_stop23/.
#   experiments/robust/report.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
R=.venv/bin/robustdet
PY=.venv/bin/python
E=experiments/robust
$PY $E/archive.py runs/robust $E
# the unfinished cells' lines are the sweep's state, not a result
$R compare $E/cells --baseline method=baseline --metrics AP,AP50,AP75,APs,APm --plot $E/plots \
    --plot-metrics AP,AP50 | grep -v "not finished" > $E/compare.txt
$PY $E/recovery.py $E/summary.csv > $E/recovery.txt
if [ -d runs/robust-select ]; then
    cp runs/robust-select/summary.csv $E/select_summary.csv
    $R compare runs/robust-select --baseline method=baseline --metrics AP,AP50,AP75 \
        | grep -v "not finished" > $E/select_compare.txt
fi
git status --short $E
