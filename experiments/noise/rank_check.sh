#!/usr/bin/env bash
# The σ study's detectors evaluated again with no score threshold (model.score_thresh=0.0). With s
# converged, every score can fall below the default 0.05 and the run reports AP 0; this says whether the
# ranking of the detections survived. Writes eval_thresh0.json into each finished cell (once) and prints
# a table:
#   experiments/noise/rank_check.sh runs/noise/sigma > experiments/noise/sigma_thresh0.md
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-runs/noise/sigma}
printf "| cell | AP (threshold 0.05) | AP50 (0.05) | AP (no threshold) | AP50 (none) | AP75 (none) |\n"
printf "|---|---|---|---|---|---|\n"
for cell in "$DIR"/*/; do
    cell=${cell%/}
    [ -f "$cell/metrics.json" ] || continue
    out="$cell/eval_thresh0.json"
    [ -f "$out" ] || .venv/bin/robustdet eval "$cell/checkpoints/last.pt" model.score_thresh=0.0 --out "$out" > /dev/null
    .venv/bin/python - "$cell" <<'PY'
import json, sys
from pathlib import Path
cell = Path(sys.argv[1])
run = json.loads((cell / "metrics.json").read_text())["bbox"]
none = json.loads((cell / "eval_thresh0.json").read_text())["bbox"]
print(f"| {cell.name} | {run['AP']:.1f} | {run['AP50']:.1f} | {none['AP']:.1f} | {none['AP50']:.1f} | {none['AP75']:.1f} |")
PY
done
