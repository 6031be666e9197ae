"""Which multihead_ce backend is faster on the CPU for one wide task (the default recipe's
``task_sampling="all_classes"``: every image's head is the whole class table)? The fused
C++ kernel against the reference (one BLAS ``z @ W.T``, log-softmax), forward + backward,
median of interleaved rounds, at the class counts of the Omniglot subsets (644 with
rotations), the whole background set (2,592) and around them.

    python benchmarks/experiments/head_width.py   # -> benchmarks/results/head_width_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import write_result  # noqa: E402

from fastmtl.ops import multihead_ce  # noqa: E402


def _case(rows: int, dim: int, classes: int, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, dim, generator=g, requires_grad=True)
    w = torch.randn(classes, dim, generator=g, requires_grad=True)
    tc = torch.arange(classes)[None]
    st = torch.zeros(rows, dtype=torch.long)
    y = torch.randint(0, classes, (rows,), generator=g)
    times: dict[str, list[float]] = {"cpu": [], "reference": []}

    def run(backend: str) -> None:
        z.grad = w.grad = None
        multihead_ce(z, w, tc, st, y, backend=backend).backward()

    for b in times:
        run(b)
    for _ in range(rounds):
        for b in times:                      # interleaved: the same load for both
            t0 = time.perf_counter()
            run(b)
            times[b].append(1000 * (time.perf_counter() - t0))
    out = {f"{b}_ms": statistics.median(t) for b, t in times.items()}
    out["cpu_over_reference"] = out["cpu_ms"] / out["reference_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(2)
    cases = []
    for rows, dim in ((64, 64), (64, 128), (128, 64)):
        for classes in (40, 160, 644, 1300, 2592, 5000):
            r = {"rows": rows, "dim": dim, "classes": classes,
                 **_case(rows, dim, classes, args.rounds)}
            print(r, flush=True)
            cases.append(r)
    path = write_result("head_width_cpu", {"what": __doc__.splitlines()[0],
                                           "rounds": args.rounds, "cases": cases})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
