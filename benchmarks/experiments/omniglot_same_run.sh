#!/bin/bash
# The README's episodic Omniglot command (the paper recipe spelled out), cut to 2 epochs, run
# with the tree before the trainer-core refactoring (a worktree at /tmp/old: `git worktree
# add /tmp/old e75e827`) and with the installed fastmtl; compare old.json with new.json
# (benchmarks/results/refactor_same_run.json, "omniglot_command"). Run from anywhere.
ROOT="${FASTMTL_OMNIGLOT:-$(cd "$(dirname "$0")/../.." && pwd)/../shared/data/omniglot}"
FLAGS="--data omniglot --root $ROOT --rotations --augment --head cosine --scale 10 --n-way 20 --tasks-per-step 2 --images-per-class 10 --tasks-per-epoch 100 --epochs 2 --val-episodes 100 --eval-episodes 100 --backend reference"
mkdir -p /tmp/omni_cmp && cd /tmp/omni_cmp
PYTHONPATH=/tmp/old python -m fastmtl train $FLAGS --out old.json > old.log 2>&1; echo "old rc=$?"
python -m fastmtl train --recipe paper $FLAGS --out new.json > new.log 2>&1; echo "new rc=$?"
