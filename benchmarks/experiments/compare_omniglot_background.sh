#!/bin/bash
# The comparison of issue 32 on the whole Omniglot background set: all five methods at the
# settings the tuning sweep chose (benchmarks/experiments/tuning/omniglot_background_tuned.json, from
# tuning/run_omniglot_background.sh and tables.py), 10 minutes each, 5-way and
# 20-way test episodes, seeds 0 and 1 side by side (one torch thread each, one core each:
# run it on an otherwise idle 2-core machine), then their merge. --centre adds the logistic
# protocol on centred features (`fastmtl eval --centre`) for every method; in the shared
# protocols the GBML baselines are frozen at the statistics of 4,096 training images
# (fastmtl.gbml.freeze_batch_stats). The committed files are from its run of 2026-12-08.
# Usage: benchmarks/experiments/compare_omniglot_background.sh ROOT OUT
set -euo pipefail
ROOT=${1:-../shared/data/omniglot-background}
OUT=${2:-runs/cmp_bg_centre}
HERE=$(dirname "$0")
one() {   # one seed
  fastmtl compare --data omniglot --root "$ROOT" --methods mtl,maml,anil,r2d2,protonet \
    --budget-minutes 10 --eval-at 10,15,20,30,45,60,90,120,180,240,300,420,600 \
    --episodes 300 --ways 5 20 --threads 1 --seed "$1" --centre \
    --settings "$HERE/tuning/omniglot_background_tuned.json" --out "$OUT/seed$1" \
    > "$OUT/seed$1.log" 2>&1
}
mkdir -p "$OUT"
one 0 &
one 1 &
wait
fastmtl merge "$OUT/seed0/compare.json" "$OUT/seed1/compare.json" --out "$OUT/merged"
