"""``fastmtl eval``: a checkpoint's backbone under the logistic-regression protocol."""
from __future__ import annotations

from .. import distributed as _dist
from .. import registry
from .._env import machine_info
from ..checkpoint import load as load_checkpoint
from ..classifier import backbone_from_checkpoint
from ._common import (add_eval_flags, check_eval_flags, command_line, evaluate_all, say,
                      table, write_json)


def cmd_eval(args) -> int:
    _dist.init_from_env()      # under torchrun the ranks share the test episodes
    check_eval_flags(args, "--episodes", allow_zero=False)
    state = load_checkpoint(args.checkpoint, what="--checkpoint")
    run = state.get("run") or {}
    backbone = backbone_from_checkpoint(state, args.checkpoint)
    data_name = args.data or run.get("data")
    if data_name is None:
        raise ValueError(f"--checkpoint {args.checkpoint!r} does not record its data set: "
                         f"pass --data (and --root)")
    test = registry.load_dataset(
        data_name, args.root or run.get("root"), args.split,
        image_size=args.image_size or run.get("image_size"),
        seed=args.data_seed if args.data_seed is not None else run.get("data_seed", 0),
        channels=run.get("channels", 3))
    say(f"eval: {test!r}")
    rows = evaluate_all(backbone, test, args.shots, args.ways, args.queries, args.episodes,
                        args.seed)
    say(table(rows))
    write_json(args.out, {"command": command_line(), "checkpoint": args.checkpoint,
                          "data": data_name, "split": args.split, "results": rows,
                          "machine": machine_info()})
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint with the logistic-regression protocol",
                       description="Evaluate a trained backbone: per test episode, fit an "
                                   "L2-regularized logistic regression (C=3) on the support "
                                   "features and report query accuracy, mean and 95% CI.")
    p.add_argument("--checkpoint", required=True, help="a final.pt / best.pt / last.pt file")
    p.add_argument("--data", choices=registry.DATASET_NAMES, default=None,
                   help="data set (default: the one the checkpoint was trained on)")
    p.add_argument("--root", default=None, help="folder holding the data set's files")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--seed", type=int, default=0, help="seed of the test episodes")
    add_eval_flags(p, "--episodes", zero_skips=False)
    p.set_defaults(func=cmd_eval, parser=p)
