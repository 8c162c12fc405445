#!/usr/bin/env bash
# Issue 18 §3: the audit's --threshold for cleaning, chosen apart from the reported cells (run.sh, seeds 0-2
# on robust.yaml's dataset): on select.yaml's dataset and noise draws (data.synthetic.seed and
# data.train.label_noise.seed 100) with training seed 100. One audit (its folds trained once), scored again
# at each threshold; the cell trained on each cleaned.json, on the noisy labels (the control) and on the
# clean ones (what the noise costs here).
#   experiments/cleaning/select.sh [OUT]          KIND=drop (flip, jitter), THRESHOLDS="0.5 0.6 0.7 0.8 0.9"
#   .venv/bin/python experiments/cleaning/summarize.py OUT/drop40_s100
set -eu
cd "$(dirname "$0")/../.."
OUT=${1:-runs/cleaning-select}
KIND=${KIND:-drop}
SEL=(data.synthetic.seed=100 data.train.label_noise.seed=100)
experiments/cleaning/run.sh "$KIND" 40 100 "$OUT" "${SEL[@]}"   # the audit at 0.5, cleaned.json, the control
for T in ${THRESHOLDS:-0.6 0.7 0.8 0.9}; do
    THRESHOLD=$T CONTROL=0 experiments/cleaning/run.sh "$KIND" 40 100 "$OUT" "${SEL[@]}"
done
C=$OUT/clean_s100
[ -f "$C/metrics.json" ] || .venv/bin/robustdet train configs/default.yaml data.synthetic.image_size=96 \
    data.synthetic.num_classes=3 model.min_size=96 model.max_size=96 train.max_iter=1000 loss.bayesian=false \
    weighting.name=equal loss.cls_method=focal seed=100 "${SEL[@]}" eval.period=250 checkpoint.period=250 \
    --out "$C" --resume
