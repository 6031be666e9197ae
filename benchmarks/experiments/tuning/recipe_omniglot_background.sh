#!/bin/bash
# Recipe variants of MTL for the documented command on the whole Omniglot background set
# (issue 32): each variant trains for MINUTES on one torch thread (two variants side by
# side on a 2-core machine), then its final.pt is evaluated on the VALIDATION alphabets
# (5-way 1/5-shot, 20-way 1/5-shot; the plain protocol and --centre); the test alphabets
# are never touched here. (Round 4, weight decay, ran as runs/recipe/r4.sh: the same
# commands, its evaluations after all four trainings. Rounds 5 and 6, Conv-4 without its
# last max-pool and Conv-4 of width 128, ran the same commands with the patch of
# conv4_variant.py (a scratch copy of it).)
# Usage: recipe_omniglot_background.sh ROOT OUT MINUTES NAME "FLAGS" [NAME "FLAGS" ...]
set -euo pipefail
ROOT=$1; OUT=$2; MINUTES=$3; shift 3
variant() {   # NAME FLAGS
  local dir="$OUT/$1"; mkdir -p "$dir"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 fastmtl train --data omniglot --root "$ROOT" --rotations \
    --max-minutes "$MINUTES" --eval-episodes 0 --checkpoint-dir "$dir" \
    --out "$dir/train.json" $2 > "$dir/train.log" 2>&1
  for ways in 5 20; do
    OMP_NUM_THREADS=1 fastmtl eval --checkpoint "$dir/final.pt" --split val --ways "$ways" \
      --episodes 500 --out "$dir/val${ways}way.json" > "$dir/val${ways}way.log" 2>&1
    OMP_NUM_THREADS=1 fastmtl eval --checkpoint "$dir/final.pt" --split val --ways "$ways" \
      --episodes 500 --centre --out "$dir/val${ways}way_centre.json" \
      > "$dir/val${ways}way_centre.log" 2>&1
  done
}
while [ $# -ge 2 ]; do
  variant "$1" "$2" &
  shift 2
  if [ $# -ge 2 ]; then variant "$1" "$2" & shift 2; fi
  wait
done
