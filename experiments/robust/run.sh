#!/usr/bin/env bash
# Issue 17's benchmark (robust.yaml) in the order that answers the goal soonest: first each kind of noise at
# 40 % with the baseline and the methods that target it (the recovery and its interval need only those), then
# the methods' clean cells (their cost on clean labels), then every method on the other kinds, then the 20 %
# levels for the baseline and the best method of each kind (BEST, after the 40 % report), e.g.
#   BEST=bootstrap,brl,best experiments/robust/run.sh
# Start it once per core, each process single-threaded; they share the cells (robustdet sweep's claims) and
# any of them can be stopped and started again (the cells resume):
#   OMP_NUM_THREADS=1 nohup experiments/robust/run.sh > runs/robust/run-a.log 2>&1 &
#   OMP_NUM_THREADS=1 nohup experiments/robust/run.sh > runs/robust/run-b.log 2>&1 &
# A stage whose cells all finished or are held by the other process returns at once. Needs issue 16's
# model.box_uncertainty / model.var_voting (robust.yaml's box_uncertainty rows) to have landed.
cd "$(dirname "$0")/../.." || exit 1
R=.venv/bin/robustdet
S=experiments/robust/robust.yaml
O=runs/robust
mkdir -p $O
# 1. each kind at 40 % against its baseline (seeds outermost: seed 0 of every cell of a stage first), and
#    the combination of the best methods (robust.yaml's row best)
$R sweep $S --out $O --only method=baseline --only noise=clean,jitter40,flip40,drop40 "$@"
$R sweep $S --out $O --only method=box_uncertainty,box_uncertainty+voting --only noise=jitter40 "$@"
$R sweep $S --out $O --only method=bootstrap,label_smoothing,gce --only noise=flip40 "$@"
$R sweep $S --out $O --only method=brl --only noise=drop40 "$@"
$R sweep $S --out $O --only method=bayesian --only noise=clean,jitter40,flip40,drop40 "$@"
$R sweep $S --out $O --only method=best --only noise=clean,flip40,drop40,jitter40 "$@"
# 2. the cost on clean labels
$R sweep $S --out $O --only noise=clean "$@"
# 3. every method on every kind at 40 %
$R sweep $S --out $O --only noise=jitter40,flip40,drop40 "$@"
# 4. the 20 % levels: the baseline and the best method of each kind
if [ -n "${BEST:-}" ]; then
    $R sweep $S --out $O --only method=baseline,"$BEST" --only noise=jitter20,flip20,drop20 "$@"
else
    echo "run.sh: BEST (the best method of each kind at 40 %) not given: the 20 % levels are not run"
fi
