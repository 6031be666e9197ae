#!/bin/bash
# The tuning sweep of issue 32: each variant file (benchmarks/experiments/tuning/omniglot_background_v*.json,
# v0: the registry's settings) is one `fastmtl compare` of all five methods, evaluated on the
# validation alphabets (--eval-split val), 3 minutes each, one torch thread. Two variants run
# at a time (one core each), so run this on an otherwise idle 2-core machine.
# Usage: benchmarks/experiments/tuning/run_omniglot_background.sh ROOT OUT
set -euo pipefail
ROOT=${1:-../shared/data/omniglot-background}
OUT=${2:-runs/tune_bg}
HERE=$(dirname "$0")
one() {   # one variant
  fastmtl compare --data omniglot --root "$ROOT" --methods mtl,maml,anil,r2d2,protonet \
    --budget-minutes 3 --eval-at 30,60,120,180 --episodes 200 --threads 1 --seed 0 \
    --eval-split val --settings "$HERE/omniglot_background_$1.json" --out "$OUT/$1" \
    > "$OUT/$1.log" 2>&1
}
mkdir -p "$OUT"
(one v0; one v2) &
(one v1; one v3) &
wait
