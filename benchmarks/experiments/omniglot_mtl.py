"""What closes the gap on the real Omniglot subset: MTL variants at one step budget.

Each variant trains Conv-4 MTL on the training alphabets for the same number of steps
(``--steps``), then is evaluated on the held-out test alphabets (Sanskrit, Tagalog) with
the paper's protocol, 5-way 1- and 5-shot, 15 queries; the validation alphabet picks the
best epoch. Results go to benchmarks/results/omniglot_mtl_ablation.json.

    python benchmarks/experiments/omniglot_mtl.py --root ../shared/data/omniglot --steps 400
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

from fastmtl import MTLConfig, MTLTrainer
from fastmtl._env import machine_info
from fastmtl.registry import build_backbone, load_dataset
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import evaluate_shots as _evaluate_all  # noqa: E402

# name -> (use rotations as classes, config changes from the paper's recipe)
VARIANTS = {
    "paper": (False, {}),
    "paper+rot": (True, {}),
    "cosine+rot": (True, {"head": "cosine", "scale": 10.0}),
    "cosine+rot+aug": (True, {"head": "cosine", "scale": 10.0, "augment": True}),
    "cosine+rot+aug+20way": (True, {"head": "cosine", "scale": 10.0, "augment": True,
                                    "n_way": 20, "tasks_per_step": 2}),
    "cosine+rot+aug+40way": (True, {"head": "cosine", "scale": 10.0, "augment": True,
                                    "n_way": 40, "tasks_per_step": 1}),
    "cosine+rot+aug+80way5img": (True, {"head": "cosine", "scale": 10.0, "augment": True,
                                        "n_way": 80, "tasks_per_step": 1,
                                        "images_per_class": 5}),
    "cosine+rot+aug+learnscale": (True, {"head": "cosine", "scale": 10.0, "augment": True,
                                         "learn_scale": True}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder with the Omniglot archives")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per variant")
    p.add_argument("--epochs", type=int, default=8, help="epochs the steps are split into")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--episodes", type=int, default=1000, help="test episodes per setting")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                 "omniglot_mtl_ablation.json"))
    args = p.parse_args()
    val = load_dataset("omniglot", args.root, "val")
    test = load_dataset("omniglot", args.root, "test")
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    results.setdefault("runs", {})
    for name in args.variants:
        rotations, changes = VARIANTS[name]
        train = load_dataset("omniglot", args.root, "train", rotations=rotations)
        base = MTLConfig(tasks_per_step=8, images_per_class=10, val_episodes=300, seed=0)
        cfg = dataclasses.replace(base, **changes)
        # Same images per step for every variant: tasks x ways x images = 400.
        cfg.tasks_per_epoch = cfg.tasks_per_step * (args.steps // args.epochs)
        cfg.epochs = args.epochs
        torch.manual_seed(0)
        trainer = MTLTrainer(build_backbone("conv4", 1), cfg)
        t0 = time.perf_counter()
        history = trainer.fit(train, val)
        seconds = time.perf_counter() - t0
        rows = _evaluate_all(trainer.backbone, test, (1, 5), 5, 15, args.episodes, 0)
        results["runs"][name] = {"rotations": rotations, "changes": changes,
                                 "config": dataclasses.asdict(cfg), "steps": args.steps,
                                 "train_seconds": seconds, "best_epoch": trainer.best_epoch,
                                 "history": history, "test": rows}
        print(f"{name}: 1-shot {rows[0]['mean']:.2f}±{rows[0]['ci95']:.2f}  "
              f"5-shot {rows[1]['mean']:.2f}±{rows[1]['ci95']:.2f}  ({seconds:.0f}s)", flush=True)
        results["machine"] = machine_info()
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
