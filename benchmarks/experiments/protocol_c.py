"""How the test protocol's regularization (logistic regression, C) changes MTL's accuracy.

Trains MTL with the default recipe (Conv-4, the Omniglot background alphabets with
rotations, cosine learning-rate schedule over ``--horizon`` seconds) and, at each of
``--at`` seconds of training, evaluates the same features on the validation alphabet with
the logistic-regression protocol at several C (the paper's protocol: C = 3), 5-way 1- and
5-shot, the same seeded episodes for every C. The validation alphabet only: this measures
the protocol, it does not choose anything on the test alphabets.

    python benchmarks/experiments/protocol_c.py --root ../shared/data/omniglot   # -> results/protocol_c_cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path
import argparse
import os

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results, test_bench_steps
from _results import keep_freed_memory, write_result  # benchmarks/_results.py

from fastmtl import MTLConfig, MTLTrainer
from fastmtl.registry import load_dataset
from fastmtl.evaluate import embed, evaluate
from fastmtl.models import conv4
from fastmtl.training import AtTrainingSeconds

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.path.join(HERE, "..", "..", "..", "shared", "data", "omniglot"),
                   help="the Omniglot folder (its README names the files)")
    p.add_argument("--at", type=float, nargs="+", default=[30.0, 60.0],
                   help="training seconds at which to evaluate; training stops at the last")
    p.add_argument("--horizon", type=float, default=600.0,
                   help="seconds the learning-rate schedule spans (the comparison's 10 minutes)")
    p.add_argument("--C", type=float, nargs="+", default=[0.3, 1, 3, 10, 30, 100],
                   dest="cs", help="the C values to evaluate")
    p.add_argument("--episodes", type=int, default=1000, help="episodes per point and C")
    args = p.parse_args()
    if any(c <= 0 for c in args.cs):
        p.error("--C: every value must be > 0")
    if any(t <= 0 for t in args.at) or args.horizon < max(args.at):
        p.error("--at: positive seconds, none beyond --horizon")
    keep_freed_memory(mmap_threshold=1 << 30)
    train = load_dataset("omniglot", args.root, "train", rotations=True)
    val = load_dataset("omniglot", args.root, "val")
    cfg = MTLConfig.from_recipe("fast", epochs=10**6, max_minutes=args.horizon / 60, seed=0)
    torch.manual_seed(0)
    trainer = MTLTrainer(conv4(in_channels=1), cfg)
    points = []

    def point(tr, state):       # off the training clock
        was = tr.backbone.training
        feats = embed(tr.backbone, val)
        row = {"train_s": round(state.train_seconds, 1), "steps": state.step}
        for k in (1, 5):
            row[f"{k}shot"] = {str(c): evaluate(tr.backbone, val, n_way=5, k_shot=k, n_query=15,
                                                episodes=args.episodes, seed=0, C=c,
                                                features=feats, progress=False)["mean"]
                               for c in args.cs}
        tr.backbone.train(was)
        points.append(row)
        print(row, flush=True)

    at = sorted(args.at)
    trainer.fit(train, None, progress=False,
                callbacks=[AtTrainingSeconds(at, point),
                           AtTrainingSeconds([at[-1]], lambda tr, state: True)])
    write_result("protocol_c_cpu", {"recipe": "fast", "horizon_s": args.horizon,
                                    "split": "val", "n_way": 5, "episodes": args.episodes,
                                    "C": args.cs, "points": points})


if __name__ == "__main__":
    main()
