"""``fastmtl eval``: a checkpoint's backbone under the logistic-regression protocol."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .. import checks, registry
from .. import distributed as _dist
from .._env import machine_info
from ..checkpoint import load as load_checkpoint
from ..classifier import backbone_from_checkpoint
from ..evaluate import SHIFTS, feature_mean, one_shot_runs
from ._common import (
    Parser,
    add_eval_flags,
    check_eval_flags,
    command_line,
    evaluate_all,
    frozen_for_eval,
    parser_defaults,
    positive,
    refuse_inert_flags,
    say,
    table,
    write_json,
)

if TYPE_CHECKING:  # for the annotations only
    from torch import Tensor, nn

    from ..data.base import FewShotDataset


def _one_shot_runs(args: argparse.Namespace, backbone: nn.Module, run: dict[str, Any]) -> int:
    """Lake et al.'s 20 one-shot runs: error rates, nearest neighbour and logistic."""
    from ..gbml import has_batch_stats
    defaults = parser_defaults(args.parser)
    refuse_inert_flags(args, defaults, [
        (f, False, "--omniglot-runs (its 20 runs are fixed 20-way 1-shot tasks)")
        for f in ("data", "split", "seed", "shots", "ways", "queries", "episodes",
                  "data_seed", "centre", "views")] + [
        ("root", has_batch_stats(backbone), "--omniglot-runs on a checkpoint with running "
         "statistics (--root only finds a GBML checkpoint's training images)")])
    if args.out:
        checks.writable_file("--out", args.out)
    size = args.image_size or run.get("image_size") or 28
    backbone, norm = _frozen(args, run, backbone)
    try:
        res = one_shot_runs(backbone, args.omniglot_runs, image_size=size, C=args.C)
    except ValueError as exc:
        raise ValueError(f"--omniglot-runs: {exc}") from None
    say(f"Lake et al.'s {res['n_runs']} one-shot runs ({res['n_way']}-way, {size} px): error "
        f"{res['nn_error']:.2f}% nearest neighbour (cosine), {res['logistic_error']:.2f}% "
        f"logistic regression (accuracy {100 - res['nn_error']:.2f}% / "
        f"{100 - res['logistic_error']:.2f}%)")
    write_json(args.out, {"command": command_line(), "checkpoint": args.checkpoint,
                          "protocol": "omniglot-one-shot-runs", "runs_file": args.omniglot_runs,
                          "results": res, "batchnorm": norm, "machine": machine_info()})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _dist.init_from_env()      # under torchrun the ranks share the test episodes
    check_eval_flags(args, "--episodes", allow_zero=False)
    state = load_checkpoint(args.checkpoint, what="--checkpoint")
    run = state.get("run") or {}
    backbone = backbone_from_checkpoint(state, args.checkpoint)
    if args.omniglot_runs:
        return _one_shot_runs(args, backbone, run)
    data_name = args.data or run.get("data")
    if data_name is None:
        raise ValueError(f"--checkpoint {args.checkpoint!r} does not record its data set: "
                         f"pass --data (and --root)")
    data = f"--data {data_name}" + ("" if args.data else " (the checkpoint's)")
    refuse_inert_flags(args, parser_defaults(args.parser), [
        ("data_seed", registry.uses(data_name, "seed"), data),
        ("root", registry.uses(data_name, "root"), f"{data} (it is generated, not read)"),
        ("image_size", registry.uses(data_name, "image_size"),
         f"{data} (its files keep their own size)")])
    test = registry.load_dataset(
        data_name, args.root or run.get("root"), args.split,
        image_size=args.image_size or run.get("image_size"),
        seed=args.data_seed if args.data_seed is not None else run.get("data_seed", 0),
        channels=run.get("channels", 3))
    say(f"eval: {test!r}")
    backbone, norm = _frozen(args, run, backbone)
    centre = _training_mean(backbone, _training_images(args, run, "--centre")) \
        if args.centre else None
    rows = evaluate_all(backbone, test, args.shots, args.ways, args.queries, args.episodes,
                        args.seed, C=args.C, centre=centre, views=args.views)
    say(table(rows))
    features = ("CL2N (centred on the training images' mean)" if args.centre
                else "L2-normalized")
    if args.views:
        features += (f"; {len(SHIFTS)} views of each image (one-pixel shifts): the head "
                     f"fitted on every support view, each query the mean of its views")
    write_json(args.out, {"command": command_line(), "checkpoint": args.checkpoint,
                          "data": data_name, "split": args.split, "results": rows,
                          "features": features, "batchnorm": norm,
                          "machine": machine_info()})
    return 0


def _frozen(args: argparse.Namespace, run: dict[str, Any],
            backbone: nn.Module) -> tuple[nn.Module, str]:
    """A GBML backbone frozen at the statistics of its training images as trained on (as
    ``fastmtl compare`` does), where they can be read; else as it is, and says so."""
    from ..gbml import has_batch_stats
    if not has_batch_stats(backbone):
        return backbone, "running statistics"
    try:
        train = _training_images(args, run, "a GBML checkpoint",
                                 rotations=bool(run.get("rotations")))
    except ValueError as exc:
        say(f"eval: {exc}; each embedding batch is normalized with its own statistics")
        return backbone, "each embedding batch's statistics"
    return frozen_for_eval(backbone, train)


def _training_images(args: argparse.Namespace, run: dict[str, Any], why: str,
                     rotations: bool = False) -> FewShotDataset:
    """The images the checkpoint was trained on (its training split, read again: from
    --root where that names the same data set, else from where it was trained; at the
    test images' size), for ``why`` (--centre: without rotations; a GBML checkpoint)."""
    data = run.get("data")
    if data is None:
        raise ValueError(f"{why}: --checkpoint {args.checkpoint!r} does not record the "
                         f"data it was trained on")
    root = args.root if args.root and args.data in (None, data) else run.get("root")
    try:
        return registry.load_dataset(data, root, run.get("train_split", "train"),
                                     image_size=args.image_size or run.get("image_size"),
                                     seed=run.get("data_seed", 0),
                                     channels=run.get("channels", 3),
                                     **({"rotations": True} if rotations else {}))
    except ValueError as exc:
        raise ValueError(f"{why} needs the checkpoint's training images: {exc}") from None


def _training_mean(backbone: nn.Module, train: FewShotDataset) -> Tensor:
    """--centre: the mean feature of the checkpoint's training images."""
    say(f"centre: the mean feature of {train!r}")
    return feature_mean(backbone, train, progress=_dist.is_main())


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint with the logistic-regression protocol",
                       description="Evaluate a trained backbone: per test episode, fit an "
                                   "L2-regularized logistic regression (C=3 unless --C) on the "
                                   "support features and report query accuracy, mean and 95% "
                                   "CI.")
    p.add_argument("--checkpoint", required=True, help="a final.pt / best.pt / last.pt file")
    p.add_argument("--data", choices=registry.DATASET_NAMES, default=None,
                   help="data set (default: the one the checkpoint was trained on)")
    p.add_argument("--root", default=None, help="folder holding the data set's files")
    p.add_argument("--split", default="test",
                   help="split to evaluate on: train, val or test; Omniglot also trainval "
                        "and the Vinyals split's vinyals-train / -val / -test / -trainval")
    p.add_argument("--seed", type=int, default=0, help="seed of the test episodes")
    add_eval_flags(p, "--episodes", zero_skips=False)
    p.add_argument("--C", type=positive("--C"), default=3.0,
                   help="inverse L2 strength of the per-episode logistic regression "
                        "(default: 3, the paper's protocol, which every reported comparison "
                        "uses)")
    p.add_argument("--centre", action="store_true",
                   help="centre the features on the mean feature of the checkpoint's training "
                        "images before the L2 normalization (SimpleShot's CL2N; reads the "
                        "training split again from where it was trained). Default: off, the "
                        "paper's protocol")
    p.add_argument("--views", action="store_true",
                   help="embed each image also at its 8 one-pixel shifts: the head is fitted "
                        "on all 9 views of each support image, each query scored on the mean "
                        "of its 9 (inductive; 9x the embedding). Default: off, the paper's "
                        "protocol")
    p.add_argument("--omniglot-runs", default=None, metavar="ZIP",
                   help="instead of episodes of a data set: Lake et al.'s 20 official 20-way "
                        "one-shot runs (all_runs.zip of github brendenlake/omniglot, "
                        "python/one-shot-classification); prints and writes the error rate "
                        "of nearest neighbour by cosine and of the logistic protocol")
    p.set_defaults(func=cmd_eval, parser=p)
