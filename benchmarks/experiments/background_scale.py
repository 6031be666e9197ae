"""Does a step cost more at the whole background set's scale? Omniglot's small subsets
give 644 training classes with rotations, the whole background set 2,592 (4x the head
table). For each method at its comparison settings (``fastmtl.compare.config_for``,
Conv-4, 28 px), the median time of a training step (batch drawn before the clock) per
image on each training set, interleaved; and the parts that could grow with the number
of classes: the batch (sampler and assembly), MTL's head op forward + backward over the
whole table, and the augmentation.

    python benchmarks/experiments/background_scale.py \\
        --small ../shared/data/omniglot --background ../shared/data/omniglot-background
        # -> benchmarks/results/background_scale_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import keep_freed_memory, write_result  # noqa: E402

from fastmtl import registry  # noqa: E402
from fastmtl.compare import config_for  # noqa: E402
from fastmtl.ops import multihead_ce  # noqa: E402


def _median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _step_ms(method: str, train, rounds: int) -> tuple[float, float, int]:
    """(median step ms, median batch ms, images a step) of ``method`` on ``train``."""
    long = {} if registry.METHODS[method].recipe else {"tasks_per_epoch": 100_000}
    cls, cfg = config_for(method, long)
    torch.manual_seed(0)
    trainer = cls(registry.build_backbone("conv4", 1), cfg)
    batches = iter(trainer.prepare(train))
    for _ in range(3):
        trainer.train_step(next(batches))
    pending = []
    batch_ms = _median_ms(lambda: pending.append(next(batches)), rounds)
    step_ms = _median_ms(lambda: trainer.train_step(pending.pop()), rounds)
    return step_ms, batch_ms, trainer._images_per_step if hasattr(trainer, "_images_per_step") \
        else cfg.tasks_per_step * cfg.n_way * (cfg.k_shot + cfg.n_query)


def _head_ms(classes: int, rounds: int) -> float:
    z = torch.randn(64, 128, requires_grad=True)
    w = torch.randn(classes, 128, requires_grad=True)
    task_classes = torch.arange(classes)[None]
    sample_task = torch.zeros(64, dtype=torch.long)
    labels = torch.randint(0, classes, (64,))

    def run():
        multihead_ce(z, w, task_classes, sample_task, labels).sum().backward()
    run()
    return _median_ms(run, rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", required=True)
    p.add_argument("--background", required=True)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--methods", default="mtl,maml,anil,r2d2,protonet")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory(mmap_threshold=1 << 30)
    sets = {name: registry.load_dataset("omniglot", root, "train", rotations=True)
            for name, root in (("small", args.small), ("background", args.background))}
    out = {"classes": {k: v.n_classes for k, v in sets.items()}, "steps": {}, "head_ms": {}}
    for method in args.methods.split(","):
        for name, train in sets.items():       # interleaved: the same load for both
            step, batch, images = _step_ms(method, train, args.rounds)
            out["steps"].setdefault(method, {})[name] = {
                "step_ms": step, "batch_ms": batch, "images": images,
                "step_us_per_image": 1000 * step / images}
            print(method, name, out["steps"][method][name], flush=True)
        s, b = (out["steps"][method][k]["step_ms"] for k in ("small", "background"))
        out["steps"][method]["background_over_small"] = b / s
    for name, train in sets.items():
        out["head_ms"][name] = _head_ms(train.n_classes, 50)
    print(out["head_ms"])
    path = write_result("background_scale_cpu", {"what": __doc__.splitlines()[0],
                                                 "rounds": args.rounds, **out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
