"""Does centring the features (CL2N) help early checkpoints? The validation alphabets.

The comparison of issue 32 is decided in the first minutes, and `fastmtl eval --centre`
(features centred on the training images' mean before the L2 normalization) was chosen
on final checkpoints. This trains one method with its tuned comparison settings (28 px,
rotations, one torch thread) for 3 minutes and at fixed training times evaluates its
backbone on the 163 validation characters, 200 episodes a setting (the same for every
point): the logistic protocol on L2-normalized features, the same on features centred on
the mean feature of 4,096 seeded training images, and the method's own adaptation where
it has one. Validation only: it decides whether `fastmtl compare --centre` is worth
running, never a test figure.

Usage:
    python benchmarks/experiments/tuning/early_protocols.py SEED METHOD LR \
        [--root ../shared/data/omniglot-background] [--out runs/early]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from fastmtl import registry
from fastmtl.compare import centre_sample, config_for
from fastmtl.evaluate import embed, evaluate, feature_mean
from fastmtl.training import AtTrainingSeconds

TIMES = [10, 20, 30, 45, 60, 90, 120, 180]
SETTINGS = [(5, 1), (5, 5), (20, 1)]


def background_data(root: str):
    """(training split with rotations, validation split, the 4,096-image centring sample
    of the training split without rotations) of the background set at 28 px."""
    train = registry.load_dataset("omniglot", root, "train", rotations=True)
    val = registry.load_dataset("omniglot", root, "val")
    return train, val, centre_sample(registry.load_dataset("omniglot", root, "train"), 123)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seed", type=int)
    ap.add_argument("method", choices=registry.METHOD_NAMES)
    ap.add_argument("lr", type=float, help="the tuned learning rate")
    ap.add_argument("--root", default="../shared/data/omniglot-background")
    ap.add_argument("--out", default="runs/early")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, val, sample = background_data(args.root)
    cls, cfg = config_for(args.method, {"lr": args.lr}, args.seed, 3.0, None)
    torch.manual_seed(args.seed)
    trainer = cls(registry.build_backbone("conv4", train.channels), cfg)
    rows = []

    def at(tr, state):
        raw = embed(tr.backbone, val, normalize=False)
        mu = feature_mean(tr.backbone, sample)
        feats = {"L2": F.normalize(raw, dim=-1), "CL2N": F.normalize(raw - mu, dim=-1)}
        row = {"t": state.train_seconds, "steps": state.step}
        for w, k in SETTINGS:
            for name, f in feats.items():
                r = evaluate(tr.backbone, val, n_way=w, k_shot=k, n_query=15, episodes=200,
                             seed=0, features=f, progress=False)
                row[f"{w}w{k} {name}"] = round(r["mean"], 2)
            if tr.own_adaptation and tr.supports_ways(w):
                row[f"{w}w{k} own"] = round(tr.evaluate(
                    val, n_way=w, k_shot=k, n_query=15, episodes=200, seed=0,
                    progress=False)["mean"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if tr.learner is not None:
            tr.learner.train()

    trainer.fit(train, progress=False, callbacks=[AtTrainingSeconds(TIMES, at)])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.method}_s{args.seed}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
