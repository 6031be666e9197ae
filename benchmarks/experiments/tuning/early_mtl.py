"""Which MTL settings speed up its first two minutes? The validation alphabets only.

The 5-way goals of issue 32 are decided in the first minute, where R2D2 and ProtoNet lead
MTL. This trains MTL with its tuned comparison settings plus ``--set`` overrides on the
10-minute schedule of ``fastmtl compare`` (the cosine schedule and warm-up as in the
race), stops after the last time, and at each time scores its backbone on the 163
validation characters, 200 seeded 5-way episodes a setting (the same for every point and
variant): the logistic protocol on L2-normalized features and on features centred on the
mean feature of 4,096 seeded training images (`fastmtl eval --centre`). It decides which
variants are worth an equal-tuning round for every method, never a test figure.

``--ema 0.995,0.998`` also keeps exponential moving averages of the backbone (parameters
and BatchNorm buffers, updated after every step, off the training clock) and scores each
at the same points, keys ``ema0.995 5w1 CL2N`` and so on: a comparison at equal steps
within one run, which the machine's load does not change.

Usage (cwd: the repository root)::

    python benchmarks/experiments/tuning/early_mtl.py SEED LABEL '{"warmup_steps": 0}' \
        [--ema 0.995,0.998] [--root ../shared/data/omniglot-background] [--out runs/early_mtl]
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F

from fastmtl import registry
from fastmtl._env import machine_info
from early_protocols import background_data  # this folder (run as a script)
from fastmtl.compare import config_for
from fastmtl.evaluate import embed, evaluate, feature_mean
from fastmtl.training import AtTrainingSeconds, Callback

TIMES = [10, 20, 30, 45, 60, 90, 120]
SHOTS = (1, 5)
TUNED = {"lr": 0.004}   # MTL's choice in the equal tuning (omniglot_background_tuned.json)


class EMA(Callback):
    """Moving averages of the trainer's backbone state, one per decay, after every step."""

    def __init__(self, decays):
        self.decays, self.copies = decays, {}

    def on_step_end(self, trainer, state):
        live = trainer.backbone.state_dict()
        for d in self.decays:
            if d not in self.copies:
                self.copies[d] = copy.deepcopy(trainer.backbone).eval()
            with torch.no_grad():
                for k, v in self.copies[d].state_dict().items():
                    if v.dtype.is_floating_point:
                        v.lerp_(live[k], 1.0 - d)
                    else:
                        v.copy_(live[k])


def score(backbone, val, sample, prefix=""):
    """5-way 1- and 5-shot validation accuracy, L2 and centred features."""
    raw = embed(backbone, val, normalize=False)
    mu = feature_mean(backbone, sample)
    feats = {"L2": F.normalize(raw, dim=-1), "CL2N": F.normalize(raw - mu, dim=-1)}
    row = {}
    for k in SHOTS:
        for name, f in feats.items():
            r = evaluate(backbone, val, n_way=5, k_shot=k, n_query=15, episodes=200,
                         seed=0, features=f, progress=False)
            row[f"{prefix}5w{k} {name}"] = round(r["mean"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seed", type=int)
    ap.add_argument("label")
    ap.add_argument("overrides", help="JSON object of MTLConfig fields over the tuned ones")
    ap.add_argument("--ema", default="", help="comma-separated EMA decays to score too")
    ap.add_argument("--root", default="../shared/data/omniglot-background")
    ap.add_argument("--out", default="runs/early_mtl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, val, sample = background_data(args.root)
    overrides = dict(TUNED, **json.loads(args.overrides))
    cls, cfg = config_for("mtl", overrides, args.seed, 10.0, None)
    torch.manual_seed(args.seed)
    trainer = cls(registry.build_backbone("conv4", train.channels), cfg)
    rows = []
    ema = EMA([float(d) for d in args.ema.split(",") if d])

    def at(tr, state):
        row = {"t": round(state.train_seconds, 1), "steps": state.step,
               **score(tr.backbone, val, sample)}
        for d, net in ema.copies.items():
            row.update(score(net, val, sample, f"ema{d} "))
        tr.backbone.train()
        rows.append(row)
        print(args.label, json.dumps(row), flush=True)
        return state.train_seconds >= TIMES[-1]

    trainer.fit(train, progress=False, callbacks=[ema, AtTrainingSeconds(TIMES, at)])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.label}_s{args.seed}.json"), "w") as f:
        json.dump({"label": args.label, "seed": args.seed, "overrides": overrides,
                   "ema": args.ema or None,
                   "machine": machine_info(),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
