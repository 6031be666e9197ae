"""MAML and ANIL meta-steps against the learn2learn pattern, interleaved in one process.

The pytest-benchmark group ``maml-vs-l2l`` (test_bench_steps.py) times each contender's
rounds back to back; on a 2-core CPU the ratios of contenders that differ by a few percent
then depend on which ran first. This script runs the contenders round-robin, rotating
their order every round (each contender first equally often), and reports medians and
ratios to the learn2learn-style loop (on the textbook Conv-4 a learn2learn user has:
conv-BN-ReLU-pool, NCHW; and, to separate the loop from the backbone, on fastmtl's
channels-last Conv-4): fastmtl's per-task loop (``vectorize=False``, the
trainer's own meta-gradient: one backward per task) and the vectorized path
(``vectorize=True``: MAML's tasks side by side as channel groups, fastmtl.gbml._stacked,
and beside it MAML's earlier vmapped form; ANIL's backbone one stacked call for all
tasks, its head's inner loop vmapped), and which of the two ``vectorize=None`` picks here. Shapes as
test_bench_steps.py: the comparison's (4 tasks, 5 queries a class, 1 inner step) and the
issue's (16 tasks, 15 queries a class, 1 and 5 inner steps). Second order, Adam.

    python benchmarks/experiments/maml_vs_l2l.py           # -> results/maml_vs_l2l_cpu.json
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
from test_bench_steps import (SHAPES, _episodes, _fastmtl_step, _L2LStyle, _L2LStyleANIL,
                              textbook_conv4)

from fastmtl.gbml import ANIL, MAML
from fastmtl.models import conv4


def _seeded_conv4():
    torch.manual_seed(0)
    return conv4(in_channels=1)


def _fastmtl_default(method) -> bool:
    """What vectorize=None picks for the method on this machine's CPU."""
    cls = MAML if method == "maml" else ANIL
    return cls(conv4(in_channels=1, hidden=8), device="cpu").vectorized()


def run(method: str, shape: str, rounds: int) -> dict:
    tasks, queries, steps = SHAPES[shape]
    batch = _episodes(tasks, queries)
    torch.manual_seed(0)
    style = _L2LStyle if method == "maml" else _L2LStyleANIL
    contenders = {"l2l-style": style(textbook_conv4(), 0.4, steps).meta_step,
                  "l2l-style, fastmtl's Conv-4": style(_seeded_conv4(), 0.4, steps).meta_step,
                  "fastmtl-loop": _fastmtl_step(False, tasks, steps, method),
                  "fastmtl-vectorized": _fastmtl_step(True, tasks, steps, method)}
    if method == "maml":        # the vectorized form before it ran stacked: vmap
        contenders["fastmtl-vmap"] = _fastmtl_step(True, tasks, steps, method, stack=False)
    names = list(contenders)
    times = {n: [] for n in names}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            contenders[n](*batch)
            if r:                       # round 0 warms every contender up
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    same = med["l2l-style, fastmtl's Conv-4"]
    return {"median_s": med, "rounds": rounds,
            "loop_vs_l2l": med["l2l-style"] / med["fastmtl-loop"],
            "vectorized_vs_l2l": med["l2l-style"] / med["fastmtl-vectorized"],
            "loop_vs_l2l_same_backbone": same / med["fastmtl-loop"],
            "vectorized_vs_l2l_same_backbone": same / med["fastmtl-vectorized"],
            **({"vmap_vs_l2l": med["l2l-style"] / med["fastmtl-vmap"]} if "fastmtl-vmap" in med
               else {}),
            "default": "vectorized" if _fastmtl_default(method) else "loop",
            "load_average": machine_info()["load_average"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds of the smallest shape "
                   "(the 16-task shapes get a third, the 5-step one a sixth)")
    args = p.parse_args()
    keep_freed_memory(mmap_threshold=1 << 30)
    out = {}
    for method in ("maml", "anil"):
        for shape, (tasks, _, steps) in SHAPES.items():
            rounds = args.rounds if tasks == 4 else max(3, args.rounds // (3 * steps))
            out[f"{method} {shape}"] = row = run(method, shape, rounds)
            print(f"{method} {shape}: loop {row['loop_vs_l2l']:.3f}x, vectorized "
                  f"{row['vectorized_vs_l2l']:.3f}x of the learn2learn-style loop (same "
                  f"backbone: {row['loop_vs_l2l_same_backbone']:.3f}x, "
                  f"{row['vectorized_vs_l2l_same_backbone']:.3f}x) "
                  f"({ {k: round(v * 1e3, 1) for k, v in row['median_s'].items()} } ms)",
                  flush=True)
    write_result("maml_vs_l2l_cpu", {"ratios": out, "order": "round-robin, rotated"})


if __name__ == "__main__":
    main()
