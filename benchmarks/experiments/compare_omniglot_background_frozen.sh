#!/bin/bash
# Superseded (kept for the record; its figures are in benchmarks/results/ledger.jsonl): the
# committed compare_omniglot_background_{seed0,seed1,merged} files come from a full run of
# compare_omniglot_background.sh of 2026-12-08. Before that they were made so:
# the run of compare_omniglot_background.sh (2026-12-07, with --centre), then R2D2 and
# ProtoNet run again after `fastmtl compare` began to evaluate batch-statistics backbones
# in the shared logistic and centred protocols on a copy frozen at training statistics
# (fastmtl.gbml.freeze_batch_stats). Their results are removed from each seed's
# compare.json and `--resume` keeps MTL, MAML and ANIL (MAML's and ANIL's shared rows
# are still the old per-batch ones; the resumed files say so in resumed_from). Two seeds
# side by side, one thread each, on an otherwise idle 2-core machine.
# Usage: benchmarks/experiments/compare_omniglot_background_frozen.sh ROOT OUT
# (OUT holds seed0/compare.json and seed1/compare.json of the first run)
set -euo pipefail
ROOT=${1:-../shared/data/omniglot-background}
OUT=${2:-runs/cmp_bg_frozen}
HERE=$(dirname "$0")
for s in 0 1; do
  python -c "import json, sys; p = sys.argv[1]; d = json.load(open(p))
for m in ('r2d2', 'protonet'): d['results'].pop(m, None)
json.dump(d, open(p, 'w'))" "$OUT/seed$s/compare.json"
done
one() {   # one seed
  fastmtl compare --data omniglot --root "$ROOT" --methods mtl,maml,anil,r2d2,protonet \
    --budget-minutes 10 --eval-at 10,15,20,30,45,60,90,120,180,240,300,420,600 \
    --episodes 300 --ways 5 20 --threads 1 --seed "$1" --centre \
    --settings "$HERE/tuning/omniglot_background_tuned.json" --out "$OUT/seed$1" --resume \
    > "$OUT/seed$1.log" 2>&1
}
one 0 &
one 1 &
wait
fastmtl merge "$OUT/seed0/compare.json" "$OUT/seed1/compare.json" --out "$OUT/merged"
