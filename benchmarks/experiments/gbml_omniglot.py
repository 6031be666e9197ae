"""Bounded GBML runs on real Omniglot: Conv-4, 5-way 1-shot, the MTL alphabet split.

    python benchmarks/experiments/gbml_omniglot.py --minutes 2 --threads 1           # all methods
    python benchmarks/experiments/gbml_omniglot.py --methods maml anil --minutes 2   # some; merged in

Each method meta-trains a fresh Conv-4 (64 filters) on ``Omniglot(root, split="train")``
with rotations by 90/180/270 degrees as extra classes (as MAML and ProtoNet do) for a
fixed wall-clock budget, then is tested on ``split="test"`` (alphabets never seen) on
the same seeded 5-way 1-shot episodes (15 queries per class) twice: with the method's
own test-time adaptation (``trainer.evaluate``) and with the logistic-regression protocol
(``fastmtl.evaluate`` on the frozen backbone). Results, settings, wall times and the
machine go to ``results/gbml_omniglot.json``; entries of methods not run are kept.

The budgets are far below the papers' (tens of thousands of meta-steps), so the numbers
are what a few minutes of a 2-core CPU buy, not the methods' converged accuracies. Every
method sees the same number of images per meta-step (120).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results, test_bench_steps
from _results import keep_freed_memory  # benchmarks/_results.py (run as a script)
from fastmtl import evaluate
from fastmtl._env import machine_info
from fastmtl.data import Omniglot, with_rotations
from fastmtl.gbml import METHODS
from fastmtl.models import conv4

RESULT = Path(__file__).resolve().parents[1] / "results" / "gbml_omniglot.json"
DEFAULT_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot"

# Bounded-run settings. MAML/FO-MAML/ANIL: the paper's Omniglot inner loop (one step of
# 0.4 in training, three at test) with 4 tasks of 5 queries per class per meta-step:
# within minutes, more meta-steps beat the paper's 32 tasks per step. ProtoNet and R2D2:
# higher-way training as their papers (20-way here, one task per meta-step). Every
# method sees 120 images per meta-step.
SETTINGS = {
    "maml": dict(n_way=5, k_shot=1, n_query=5, tasks_per_step=4),
    "fomaml": dict(n_way=5, k_shot=1, n_query=5, tasks_per_step=4),
    "anil": dict(n_way=5, k_shot=1, n_query=5, tasks_per_step=4),
    "r2d2": dict(n_way=20, k_shot=1, n_query=5, tasks_per_step=1),
    "protonet": dict(n_way=20, k_shot=1, n_query=5, tasks_per_step=1, lr_decay_every=None),
}


def run(method: str, train, test, minutes: float, episodes: int, seed: int) -> dict:
    cls, config_cls, fixed = METHODS[method]
    settings = dict(SETTINGS[method], **fixed)
    # Short epochs so the wall-clock budget is checked often (it is checked per epoch).
    cfg = config_cls(**settings, tasks_per_epoch=20 * settings["tasks_per_step"], epochs=100_000,
                     max_minutes=minutes, seed=seed)
    torch.manual_seed(seed)
    trainer = cls(conv4(in_channels=1), cfg)
    t0 = time.perf_counter()
    history = trainer.fit(train, progress=False)
    train_s = time.perf_counter() - t0
    steps = sum(1 for _ in history) * (cfg.tasks_per_epoch // cfg.tasks_per_step)
    t1 = time.perf_counter()
    own = trainer.evaluate(test, n_way=5, k_shot=1, n_query=15, episodes=episodes, seed=seed,
                           progress=False)
    own_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    logistic = evaluate(trainer.backbone, test, n_way=5, k_shot=1, n_query=15,
                        episodes=episodes, seed=seed, progress=False)
    logistic_s = time.perf_counter() - t2
    for r in (own, logistic):
        r.pop("accuracies")
    print(f"{method:9s} {steps:5d} meta-steps in {train_s:5.0f} s | own {own['mean']:.2f} "
          f"± {own['ci95']:.2f}% | logistic {logistic['mean']:.2f} ± {logistic['ci95']:.2f}%",
          flush=True)
    return {"method": method, "config": dataclasses.asdict(cfg), "meta_steps": steps,
            "train_seconds": train_s, "final_train_loss": history[-1]["train_loss"],
            "final_train_acc": history[-1]["train_acc"],
            "own": dict(own, seconds=own_s), "logistic": dict(logistic, seconds=logistic_s),
            "total_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.environ.get("FASTMTL_OMNIGLOT", str(DEFAULT_ROOT)),
                   help="folder with the Omniglot archives (default: ../shared/data/omniglot)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--minutes", type=float, default=2.0, help="training budget per method")
    p.add_argument("--episodes", type=int, default=300, help="test episodes per protocol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 is faster on a busy shared CPU")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="raise glibc's mmap/trim thresholds (default) or leave them")
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"Omniglot not found at {args.root}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "tuned":
        # Keep freed blocks for reuse: the vmapped meta-batch's activations are above
        # glibc's 32 MB mmap limit, and re-mapping them each step cost a third of a step in
        # page faults (see benchmarks/test_bench_gbml.py).
        keep_freed_memory(mmap_threshold=1 << 30)
    train = with_rotations(Omniglot(args.root, split="train"))
    test = Omniglot(args.root, split="test")
    print(f"train {train!r}\ntest {test!r}", flush=True)
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.exists() else {"results": {}}
    for method in args.methods:
        load = list(os.getloadavg())
        result = run(method, train, test, args.minutes, args.episodes, args.seed)
        result.update(load_average_at_start=load, load_average_at_end=list(os.getloadavg()),
                      started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        payload["results"][method] = result
        payload.update(
            name="gbml_omniglot",
            protocol="5-way 1-shot, 15 queries per class, the same seeded test episodes for "
                     "both protocols; 'own' = the method's test-time adaptation, 'logistic' = "
                     "fastmtl.evaluate (L2 logistic regression, C=3, on L2-normalized features)",
            data={"train": "Omniglot split='train' (5 alphabets, 161 characters) with rotations "
                           "as classes (644)", "test": "Omniglot split='test' (2 alphabets, "
                           "59 characters)", "image_size": 28},
            backbone="conv4(in_channels=1), 64 filters",
            batchnorm="batch statistics everywhere (the GBML convention), training and test",
            budget_minutes_per_method=args.minutes,
            machine=dict(machine_info(), torch_threads=torch.get_num_threads(),
                         malloc=args.malloc))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
