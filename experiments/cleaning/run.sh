#!/usr/bin/env bash
# Issue 18 §3, does cleaning pay? On robust.yaml's cell (96 px, 3 classes, 1,000 iterations, plain losses,
# equal weights) with one kind of noise: audit the noisy training split (2 folds, the audit's defaults:
# --threshold 0.5, --fix relabel,drop,add), then train the cell on cleaned.json and, as the control for the
# data path, on the audited noisy split written as json (fold_0 ∪ fold_1 train.json). Evaluated on the
# clean validation split as robust.yaml's cells are; summarize.py compares them with those cells.
#   experiments/cleaning/run.sh KIND PERCENT SEED [OUT [KEY=VALUE ...]]   e.g. drop 40 0 (KIND: flip, jitter, drop)
#   .venv/bin/python experiments/cleaning/summarize.py runs/cleaning/drop40_s0
# KEY=VALUE after OUT go to every audit and train command (select.sh: another dataset). THRESHOLD=T scores
# the finished audit's folds again at --threshold T (DIR/audit_tT, the folds hard-linked, not retrained) and
# trains on that cleaned.json (DIR/train_cleaned_tT). AUDIT_ITER=N trains the fold models N iterations (the
# cell trained on cleaned.json keeps its 1,000). CONTROL=0 trains on cleaned.json only. Rerunning the same command resumes it (the audit resumes its folds; a finished training is skipped).
set -eu
KIND=$1; PCT=$2; SEED=$3; OUT=${4:-runs/cleaning}; shift $(( $# < 4 ? $# : 4 ))
cd "$(dirname "$0")/../.."
RATE=$(awk "BEGIN{print $PCT/100}")
R=.venv/bin/robustdet
PY=.venv/bin/python
D=$OUT/${KIND}${PCT}_s$SEED
case $KIND in flip) KEY=class_flip ;; jitter) KEY=box_jitter ;; drop) KEY=drop ;;
    *) echo "run.sh: KIND must be flip, jitter or drop, got $KIND" >&2; exit 2 ;; esac
CELL=(data.synthetic.image_size=96 data.synthetic.num_classes=3 model.min_size=96 model.max_size=96
      train.max_iter=1000 loss.bayesian=false weighting.name=equal loss.cls_method=focal seed="$SEED" "$@")
AUDIT_ARGS=(configs/default.yaml "${CELL[@]}" eval.period=0 checkpoint.period=0 "data.train.label_noise.$KEY=$RATE"
            ${AUDIT_ITER:+train.max_iter=$AUDIT_ITER} --folds 2)
[ -f "$D/audit/cleaned.json" ] || $R audit "${AUDIT_ARGS[@]}" --out "$D/audit"
A=$D/audit; TAG=
if [ -n "${THRESHOLD:-}" ]; then
    A=$D/audit_t$THRESHOLD; TAG=_t$THRESHOLD
    if [ ! -f "$A/cleaned.json" ]; then
        rm -rf "$A"; cp -al "$D/audit" "$A"   # --overwrite replaces the outputs, keeps the same config's folds
        $R audit "${AUDIT_ARGS[@]}" --threshold "$THRESHOLD" --overwrite --out "$A" > "$A.log"
    fi
fi
ROOT=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['image_root'])" "$D/audit/audit.json")
$PY - "$D" <<'PY'
import json, sys
d = sys.argv[1]
a, b = (json.load(open(f"{d}/audit/fold_{k}/train.json")) for k in (0, 1))
a["images"] = sorted(a["images"] + b["images"], key=lambda i: i["id"])
a["annotations"] = sorted(a["annotations"] + b["annotations"], key=lambda x: x["id"])
json.dump(a, open(f"{d}/noisy.json", "w"))
PY
# CONTROL=0 skips the noisy-json control (it gave the sweep's AP to every digit on drop40 seed 0)
for J in cleaned $([ "${CONTROL:-1}" = 0 ] || echo noisy); do
    P=$([ $J = cleaned ] && echo "$A/cleaned.json" || echo "$D/noisy.json")
    T=$D/train_$J
    if [ $J = cleaned ]; then T=$T$TAG; fi   # (an assignment from a failing $(...) would end the script: set -e)
    [ -f "$T/metrics.json" ] || $R train configs/default.yaml "${CELL[@]}" eval.period=250 \
        checkpoint.period=250 "data.train={format: coco, path: $P, image_root: $ROOT}" --out "$T" --resume
done
