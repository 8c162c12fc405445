#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on one GPU, within 5 minutes; the tables also go to gpu_check.txt.
# Usage: benchmarks/gpu_check.sh [extra gpu_check.py options, e.g. --budget-s 200]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
timeout 300 "$py" "$repo/benchmarks/gpu_check.py" --device cuda "$@" | tee gpu_check.txt
