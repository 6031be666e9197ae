"""The shared backbone of ANIL, ProtoNet and R2D2: one stacked call against vmap and a loop.

ANIL, ProtoNet and R2D2 run one backbone for every task of a meta-batch, each task with
its own BatchNorm statistics. Vectorized, fastmtl used to ``vmap`` the backbone over the
tasks (``torch.func.functional_call``, the BatchNorm written as a composite, which vmap
needs); it now stacks the tasks along the batch and makes one call, the tasks' channels
side by side in one fused ``batch_norm`` (``fastmtl.gbml._common.stacked_features``).
This script times one training step (meta-loss, backward, Adam; second order for ANIL)
of each form in one process, round-robin with the order rotated every round, at the
shapes the comparison and the issue use, and the learn2learn-style ANIL loop of
test_bench_steps.py beside ANIL:

- ANIL: 4 tasks of 5-way 1-shot, 5 queries a class, 1 inner step (``fastmtl compare``);
  16 tasks, 15 queries a class, 1 and 5 inner steps (issue 15).
- ProtoNet, R2D2: one 20-way 1-shot task with 5 queries a class (``fastmtl compare``),
  and 4 such tasks a step.

    python benchmarks/experiments/stacked_vs_vmap.py        # -> results/stacked_vs_vmap_cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path
import argparse
import statistics
import time

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results, test_bench_steps
from _results import keep_freed_memory, machine_info, write_result  # benchmarks/_results.py
from test_bench_steps import _L2LStyleANIL

from fastmtl.gbml import ANIL, ProtoNet, R2D2, ANILConfig, ProtoNetConfig, R2D2Config
from fastmtl.gbml._common import _vmap
from fastmtl.models import conv4

SHAPES = {  # name -> (method, tasks, ways, queries a class, inner steps)
    "anil compare-4x5q-1step": ("anil", 4, 5, 5, 1),
    "anil issue-16x15q-1step": ("anil", 16, 5, 15, 1),
    "anil issue-16x15q-5steps": ("anil", 16, 5, 15, 5),
    "protonet compare-1x20w5q": ("protonet", 1, 20, 5, 0),
    "protonet 4x20w5q": ("protonet", 4, 20, 5, 0),
    "r2d2 compare-1x20w5q": ("r2d2", 1, 20, 5, 0),
    "r2d2 4x20w5q": ("r2d2", 4, 20, 5, 0),
}


def _episodes(tasks, ways, queries, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(tasks, ways, 1, 28, 28, generator=g)
    xq = torch.randn(tasks, ways * queries, 1, 28, 28, generator=g)
    ys = torch.arange(ways).expand(tasks, -1)
    yq = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return xs, ys, xq, yq


def _vmapped_features(backbone):
    """The earlier vectorized form: the backbone vmapped over tasks."""
    def feats(x):
        params = dict(backbone.named_parameters())
        return _vmap(lambda p, xt: functional_call(backbone, p, (xt,)), (None, 0))(params, x)
    return feats


def _trainer(method, tasks, ways, steps, form):
    torch.manual_seed(0)
    vectorize = form != "loop"
    if method == "anil":
        tr = ANIL(conv4(in_channels=1), ANILConfig(tasks_per_step=tasks, inner_steps=steps,
                                                   inner_lr=0.4, vectorize=vectorize))
    else:
        cls, cfg = (ProtoNet, ProtoNetConfig) if method == "protonet" else (R2D2, R2D2Config)
        tr = cls(conv4(in_channels=1), cfg(n_way=ways, tasks_per_step=tasks, vectorize=vectorize))
    tr.build((1, 28, 28))
    if form == "vmap":
        feats = _vmapped_features(tr.model.backbone)
        if method == "anil":
            tr._task_inputs = lambda xs, xq, vectorized, detach=False: (feats(xs), feats(xq))
        else:
            def split(xs, xq, vectorize):
                z = feats(torch.cat([xs, xq], 1))
                return z[:, :xs.shape[1]], z[:, xs.shape[1]:]
            tr._split_features = split
    opt = torch.optim.Adam(tr.model.parameters(), lr=1e-3)

    def step(*batch):
        opt.zero_grad(set_to_none=True)
        tr._step(*batch)
        opt.step()
    return step


def run(shape: str, rounds: int) -> dict:
    method, tasks, ways, queries, steps = SHAPES[shape]
    batch = _episodes(tasks, ways, queries)
    contenders = {form: _trainer(method, tasks, ways, steps, form)
                  for form in ("stacked", "vmap", "loop")}
    if method == "anil":
        torch.manual_seed(0)
        contenders["l2l-style"] = _L2LStyleANIL(conv4(in_channels=1), 0.4, steps).meta_step
    names = list(contenders)
    times = {n: [] for n in names}
    for r in range(rounds + 1):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            contenders[n](*batch)
            if r:                       # round 0 warms every contender up
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    row = {"median_s": med, "rounds": rounds,
           "stacked_vs_vmap": med["vmap"] / med["stacked"],
           "stacked_vs_loop": med["loop"] / med["stacked"],
           "load_average": machine_info()["load_average"]}
    if "l2l-style" in med:
        row["stacked_vs_l2l"] = med["l2l-style"] / med["stacked"]
        row["loop_vs_l2l"] = med["l2l-style"] / med["loop"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds of the small shapes (the "
                   "16-task ANIL shapes get a third, the 5-step one a sixth)")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args()
    keep_freed_memory(mmap_threshold=1 << 30)
    out = {}
    for shape in args.shapes:
        _, tasks, _, _, steps = SHAPES[shape]
        rounds = args.rounds if tasks < 16 else max(3, args.rounds // (3 * steps))
        out[shape] = row = run(shape, rounds)
        print(f"{shape}: " + ", ".join(f"{k} {v:.3f}x" for k, v in row.items()
                                       if k.endswith(("_vmap", "_loop", "_l2l"))) +
              f" ({ {k: round(v * 1e3, 1) for k, v in row['median_s'].items()} } ms)",
              flush=True)
    write_result("stacked_vs_vmap_cpu", {"ratios": out, "order": "round-robin, rotated",
                                         "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
