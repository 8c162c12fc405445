#!/usr/bin/env bash
# Issue 10's runs, in the order that completes whole comparisons (every noise level and seed) soonest:
# the demo's method against the baseline, then the two methods it combines, then the rest of the grid a
# method at a time, then the σ study, then two controls for the Bayesian loss's gain (ablation.yaml).
# Start it once per core, each process single-threaded; they share the cells (robustdet sweep's claims)
# and any of them can be stopped and started again (the cells resume):
#   OMP_NUM_THREADS=1 nohup experiments/noise/run.sh > runs/noise/run-a.log 2>&1 &
#   OMP_NUM_THREADS=1 nohup experiments/noise/run.sh > runs/noise/run-b.log 2>&1 &
# A stage whose cells all finished or are held by the other process returns at once.
cd "$(dirname "$0")/../.." || exit 1
R=.venv/bin/robustdet
mkdir -p runs/noise
$R sweep experiments/noise/grid.yaml --out runs/noise/grid --only method=baseline,bayesian+rlo "$@"
$R sweep experiments/noise/grid.yaml --out runs/noise/grid --only method=bayesian,rlo "$@"
$R sweep experiments/noise/grid.yaml --out runs/noise/grid --only method=avw "$@"
$R sweep experiments/noise/grid.yaml --out runs/noise/grid --only method=uw "$@"
$R sweep experiments/noise/grid.yaml --out runs/noise/grid "$@"
$R sweep experiments/noise/sigma.yaml --out runs/noise/sigma "$@"
$R sweep experiments/noise/ablation.yaml --out runs/noise/ablation "$@"
