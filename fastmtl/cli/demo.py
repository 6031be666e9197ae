"""``fastmtl demo``: the default recipe on the built-in data, trained and evaluated."""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from .. import checks, registry
from .._env import machine_info
from ..mtl import MTLConfig, MTLTrainer
from ._common import Parser, command_line, evaluate_all, plot_history, say, table, write_json


def demo_config(minutes: float, seed: int) -> MTLConfig:
    """The default MTL recipe (the registry's, as ``fastmtl train`` uses it) under a
    ``minutes`` budget, validated on 200 episodes an epoch."""
    return dataclasses.replace(registry.default_config("mtl"), max_minutes=minutes,
                               seed=seed, val_episodes=200)


def cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    if args.out:
        checks.writable_file("--out", args.out)
    if args.plot:
        checks.writable_file("--plot", args.plot)
    torch.manual_seed(args.seed)
    say("fastmtl demo: MTL (the default recipe) with Conv-4 on the built-in SyntheticGlyphs "
        f"(generated, seed {args.seed}), training for at most {args.minutes} min")
    train, val, test = (registry.load_dataset("synthetic", None, split, seed=args.seed)
                        for split in ("train", "val", "test"))
    say(f"train {train.n_classes} classes, val {val.n_classes}, test {test.n_classes} "
        f"(disjoint), {train.image_shape} images")
    cfg = demo_config(args.minutes, args.seed)
    trainer = MTLTrainer(registry.build_backbone("conv4", train.channels), cfg)
    history = trainer.fit(train, val)
    train_s = time.perf_counter() - t0
    rows = evaluate_all(trainer.backbone, test, (1, 5), 5, 15, args.episodes, args.seed)
    say(table(rows))
    payload = {"command": command_line(), "data": "synthetic", "backbone": "conv4",
               "config": dataclasses.asdict(cfg), "history": history,
               "best_epoch": trainer.best_epoch, "results": rows,
               "train_seconds": train_s, "total_seconds": time.perf_counter() - t0,
               "machine": machine_info()}
    write_json(args.out, payload)
    plot_history(args.plot, history, "fastmtl demo: MTL, Conv-4, SyntheticGlyphs")
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser("demo", help="train MTL on built-in synthetic glyphs and evaluate",
                       description="Train MTL (Conv-4, the default recipe) on the built-in "
                                   "SyntheticGlyphs data (generated, no download) and "
                                   "evaluate 5-way 1-/5-shot.")
    p.add_argument("--minutes", type=float, default=2.5, help="training budget (default: 2.5)")
    p.add_argument("--episodes", type=int, default=600,
                   help="test episodes per setting (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and episodes")
    p.add_argument("--out", default="demo.json", help="results JSON (default: demo.json)")
    p.add_argument("--plot", default="demo.png", help="learning-curve PNG (default: demo.png)")
    p.set_defaults(func=cmd_demo, parser=p)
