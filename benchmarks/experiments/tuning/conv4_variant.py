"""``fastmtl`` with a Conv-4 variant patched in, for recipe probes the CLI has no flag for.

Round 5 and 6 of the background-set recipe study (validation alphabets only) asked
whether a different Conv-4 would lift 5-way 1-shot: without the last block's max-pool (at
32 px a 4x4 map, 1024-d features, instead of 2x2, 256-d) and twice the width (128
channels in every block). Neither helped, so neither became a flag; this launcher runs the
CLI with the change and writes ``probe.txt`` (what was changed) into the run's
``--checkpoint-dir`` so ``recipe_tables.py`` lists it with the flags.

    python benchmarks/experiments/tuning/conv4_variant.py --no-last-pool -- \
        train --data omniglot --root ROOT --rotations --image-size 32 ...
    python benchmarks/experiments/tuning/conv4_variant.py --no-last-pool -- \
        eval --checkpoint DIR/final.pt --split val ...

A width is stored in the checkpoint's backbone spec, so plain ``fastmtl eval`` reads such a
checkpoint; the missing pool is not, so its evaluations must go through this launcher too.
(The round 5-6 runs went through a scratch copy of this patch, outside the tree; this is
its committed form, checked to build the same backbone.)
"""
from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys

import torch.nn as nn


def patch(width: int | None, last_pool: bool) -> str:
    """Patch Conv-4's constructor; returns the description written to probe.txt."""
    module = importlib.import_module("fastmtl.models.conv4")
    original = module.Conv4.__init__

    def init(self, in_channels=1, hidden=64, out_channels=64, channels_last=None):
        if width:
            hidden = out_channels = width
        original(self, in_channels, hidden, out_channels, channels_last)
        if not last_pool:      # each block: conv, BatchNorm, max-pool, ReLU
            self.blocks[-1][2] = nn.Identity()

    module.Conv4.__init__ = init
    changes = ([f"Conv-4 width {width}"] if width else []) + \
        ([] if last_pool else ["Conv-4 without the last max-pool"])
    return ", ".join(changes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=None, help="channels of every block")
    p.add_argument("--no-last-pool", action="store_true", help="keep the last block's map")
    p.add_argument("fastmtl_args", nargs=argparse.REMAINDER, help="-- then fastmtl's arguments")
    args = p.parse_args()
    rest = args.fastmtl_args[1:] if args.fastmtl_args[:1] == ["--"] else args.fastmtl_args
    what = patch(args.width, not args.no_last_pool)
    if rest[:1] == ["train"] and "--checkpoint-dir" in rest:
        folder = rest[rest.index("--checkpoint-dir") + 1]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "probe.txt"), "w") as f:
            f.write(what + "\n")
    # Run as ``python -m fastmtl`` would, so nothing outside the package imports its cli/.
    sys.argv = ["fastmtl", *rest]
    runpy.run_module("fastmtl", run_name="__main__", alter_sys=True)   # exits with the CLI's code
    return 0


if __name__ == "__main__":
    sys.exit(main())
