"""Where second-order MAML's meta-step spends its CPU time, vmapped against the per-task loop.

One meta-step of 16 tasks of 5-way 1-shot with 15 queries a class (the issue's shape, where
the vmapped path measured 0.42-0.59x of a learn2learn-style loop in maml_vs_l2l.py), Conv-4
28x28, after two warm-up steps, under ``torch.profiler``; the ops with the most self CPU
time go to ``benchmarks/results/maml_vmap_profile_cpu.json``. A diagnosis, not a timing:
the profiler's overhead is in every figure.

    python benchmarks/experiments/maml_vmap_profile.py
"""
from __future__ import annotations

import sys
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results, test_bench_steps
from _results import keep_freed_memory, write_result
from fastmtl.gbml import MAML, MAMLConfig
from fastmtl.models import conv4

TASKS, WAYS, SHOTS, QUERIES = 16, 5, 1, 15


def profile_step(vectorize: bool, batch, top: int = 12) -> dict:
    torch.manual_seed(0)
    tr = MAML(conv4(in_channels=1), MAMLConfig(n_way=WAYS, k_shot=SHOTS, n_query=QUERIES,
                                               tasks_per_step=TASKS, inner_steps=1,
                                               inner_lr=0.4, vectorize=vectorize))
    tr.build((1, 28, 28))
    for _ in range(2):
        tr._step(*batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tr._step(*batch)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    return {"self_cpu_ms_total": total / 1e3,
            "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                         "calls": e.count} for e in ops[:top]]}


def main() -> None:
    keep_freed_memory(mmap_threshold=1 << 30)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(TASKS, WAYS * SHOTS, 1, 28, 28, generator=g),
             torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1),
             torch.randn(TASKS, WAYS * QUERIES, 1, 28, 28, generator=g),
             torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1))
    out = {"shape": f"{TASKS} tasks x {WAYS}-way x ({SHOTS} + {QUERIES})",
           "loop": profile_step(False, batch), "vmapped": profile_step(True, batch)}
    path = write_result("maml_vmap_profile_cpu", out)
    for form in ("loop", "vmapped"):
        r = out[form]
        print(f"{form}: {r['self_cpu_ms_total']:.0f} ms self CPU")
        for o in r["top_ops"][:6]:
            print(f"  {o['op']:40s} {o['self_cpu_ms']:8.1f} ms {o['calls']:5d} calls")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
