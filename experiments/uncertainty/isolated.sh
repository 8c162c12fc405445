#!/usr/bin/env bash
# Issue 16 with loss.box_uncertainty_form=isolated: σ per box read out beside a detector that trains as the
# plain one bitwise. For each finished box_uncertainty_isolated cell of runs/robust (robust.yaml): variance
# voting by evaluating its checkpoint again (voting is post-processing; the +voting cells would train the same
# detector once more), then box_sigma.py on the run and on its voting folder; the lines go to
# experiments/uncertainty/results/box_sigma_isolated.jsonl. The triangles-only jitter run of this form:
#   .venv/bin/robustdet sweep experiments/uncertainty/uncertainty.yaml loss.box_uncertainty_form=isolated \
#       --out runs/uncertainty-isolated
#   experiments/uncertainty/isolated.sh [runs/uncertainty-isolated/*]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=experiments/uncertainty/results/box_sigma_isolated.jsonl
RUNS=()
for RUN in runs/robust/method=box_uncertainty_isolated__* "$@"; do
    [ -f "$RUN/metrics.json" ] || continue
    [ -f "$RUN/voting/metrics.json" ] || .venv/bin/robustdet eval "$RUN/checkpoints/last.pt" model.var_voting=true \
        --out "$RUN/voting" --save-json > /dev/null
    RUNS+=("$RUN" "$RUN/voting")
done
.venv/bin/python experiments/uncertainty/box_sigma.py "${RUNS[@]}" > "$OUT"
wc -l "$OUT"
