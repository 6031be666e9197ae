"""What MTL's MLP projector costs a training step: the fast recipe with and without it.

Both forms of the trainer's own step (128 images over the whole head table, Conv-4 28x28,
the synthetic glyphs), interleaved round by round in one process with the order swapped
every round, so machine drift falls on both; medians after one warm-up round.

    python benchmarks/experiments/projector_cost.py          # -> results/projector_cost_cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path
import argparse
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results, test_bench_steps
from _results import keep_freed_memory, machine_info, write_result  # benchmarks/_results.py

from fastmtl import MTLConfig, MTLTrainer
from fastmtl.data import SyntheticGlyphs
from fastmtl.models import conv4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="timed rounds of each form")
    args = p.parse_args()
    keep_freed_memory(mmap_threshold=1 << 30)
    data = SyntheticGlyphs(60, 20, seed=0)
    forms = {}
    for width in (0, 512):
        torch.manual_seed(0)
        cfg = MTLConfig.from_recipe("fast", projector=width, epochs=1)
        trainer = MTLTrainer(conv4(in_channels=1), cfg)
        trainer._prepare_fit(data, None)
        trainer._setup(data)
        forms[width] = (trainer, list(trainer._epoch_batches(data, 0, 8)))
    times = {w: [] for w in forms}
    for r in range(args.rounds + 1):
        for w in ((0, 512) if r % 2 else (512, 0)):
            trainer, batches = forms[w]
            t0 = time.perf_counter()
            trainer._train_step(batches[r % len(batches)])
            if r:                           # round 0 warms both up
                times[w].append(time.perf_counter() - t0)
    med = {w: statistics.median(v) for w, v in times.items()}
    payload = {"median_ms": {"without projector": med[0] * 1e3,
                             "projector 512 -> 128": med[512] * 1e3},
               "cost": med[512] / med[0], "rounds": args.rounds, "images_per_step": 128,
               "threads": torch.get_num_threads(), "machine": machine_info()}
    write_result("projector_cost_cpu", payload)
    print({k: round(v, 1) for k, v in payload["median_ms"].items()},
          f"cost x{payload['cost']:.3f}")


if __name__ == "__main__":
    main()
