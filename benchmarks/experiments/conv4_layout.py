"""Conv-4's two exact speed-ups on the CPU: channels-last activations and pool-before-ReLU.

Part 1, the backbone alone: forward + backward of Conv-4 (28x28 grey, 2 threads) at the
batch sizes the trainers run (5 support images of a MAML task, 25 of its queries, 120-128
of an MTL/ProtoNet/R2D2 step) in four forms: the textbook block (conv-BN-ReLU-pool, NCHW,
what ``Conv4`` was until 2026-12-02), pool-before-ReLU, channels-last, and both (the
``Conv4`` default on the CPU now). Part 2, the trainers: one training step of each method
with the comparison's settings (``fastmtl compare``'s table), its backbone in the textbook
form against the default form. Every pair or quartet is interleaved round by round in one
process with the order rotated, so machine drift falls on all; medians after a warm-up
round; each form's output and weight gradients are first checked against a float64
reference (their largest relative errors are in the JSON).

    python benchmarks/experiments/conv4_layout.py            # -> results/conv4_layout_cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path
import argparse
import statistics
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results, test_bench_steps
from _results import keep_freed_memory, write_result  # benchmarks/_results.py

from fastmtl.compare import METHODS, config_for
from fastmtl.data import SyntheticGlyphs
from fastmtl.models import conv4
from test_bench_steps import textbook_conv4 as textbook


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds + 1):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            if r:                       # round 0 warms every form up
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def backbone(rounds: int) -> dict:
    forms = {"textbook": textbook(), "pool before ReLU": textbook(pool_first=True),
             "channels-last": textbook(channels_last=True),
             "both (default)": textbook(channels_last=True, pool_first=True)}
    out = {}
    ref_net = textbook().double()
    for batch in (5, 25, 128):
        x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        # Each form against a float64 reference: outputs and weight gradients.
        ref = ref_net(x.double())
        ref_g = torch.autograd.grad(ref.square().sum(), list(ref_net.parameters()))
        errors = {}
        for name, net in forms.items():
            y = net(x)
            g = torch.autograd.grad(y.square().sum(), list(net.parameters()))
            errors[name] = max(((a.double() - b).abs().max() / b.abs().max()).item()
                               for a, b in zip([y, *g], [ref, *ref_g]))
            assert errors[name] < 1e-2, (name, batch, errors[name])
        med = _interleaved({n: (lambda net=net: net(x).square().sum().backward())
                            for n, net in forms.items()}, rounds)
        out[str(batch)] = {"max_relative_error_vs_float64": errors,
                           "median_ms": {n: v * 1e3 for n, v in med.items()},
                           "speedup_vs_textbook": {n: med["textbook"] / v for n, v in med.items()}}
        print(f"batch {batch}:", {n: f"{v * 1e3:.1f} ms" for n, v in med.items()}, flush=True)
    return out


def _step_fn(method: str, net):
    cls, cfg = config_for(method, {"tasks_per_epoch": 100_000} if method != "mtl" else None)
    trainer = cls(net, cfg)
    data = SyntheticGlyphs(64, 20, seed=0)
    trainer._prepare_fit(data, None)
    trainer._setup(data)
    batches = list(trainer._epoch_batches(data, 0, 6))
    state = {"i": 0}

    def step():
        trainer._train_step(batches[state["i"] % len(batches)])
        state["i"] += 1
    return step


def steps(methods, rounds: int) -> dict:
    out = {}
    for method in methods:
        med = _interleaved({"textbook": _step_fn(method, textbook()),
                            "default": _step_fn(method, conv4(in_channels=1))}, rounds)
        out[method] = {"median_ms": {n: v * 1e3 for n, v in med.items()},
                       "speedup": med["textbook"] / med["default"]}
        print(f"{method}: textbook {med['textbook'] * 1e3:.1f} ms, default "
              f"{med['default'] * 1e3:.1f} ms, x{out[method]['speedup']:.2f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="timed rounds of each form")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=METHODS, help="trainers whose step to time")
    args = p.parse_args()
    keep_freed_memory(mmap_threshold=1 << 30)
    payload = {"backbone_forward_backward": backbone(args.rounds),
               "train_step": steps(args.methods, args.rounds), "rounds": args.rounds,
               "threads": torch.get_num_threads()}
    write_result("conv4_layout_cpu", payload)


if __name__ == "__main__":
    main()
