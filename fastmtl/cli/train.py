"""``fastmtl train``: train MTL or a GBML baseline, then evaluate it on the test split."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from .. import checks, registry
from .. import distributed as _dist
from .._env import machine_info
from ..checkpoint import atomic_save
from ..checkpoint import load as load_checkpoint
from ..config import TrainerConfig
from ..mtl import RECIPES
from ..sampling import check_fits
from ..training import ProfileSteps, Trainer, check_same_run
from ._common import (
    HelpFormatter,
    Parser,
    add_config_flags,
    add_eval_flags,
    add_folder_flags,
    check_eval_flags,
    command_line,
    config_from,
    evaluate_all,
    folder_kwargs,
    frozen_for_eval,
    parser_defaults,
    plot_history,
    positive,
    refuse_inert_flags,
    say,
    table,
    write_json,
)

if TYPE_CHECKING:  # for the annotations only
    from ..data.base import FewShotDataset


def _load(args: argparse.Namespace, split: str, rotations: bool = False) -> FewShotDataset:
    """``split`` ("val", "test") of the family of --train-split (``vinyals-train``:
    ``vinyals-val``, ``vinyals-test``)."""
    family = args.train_split.rpartition("-")[0]
    if split in ("val", "test") and family:
        split = f"{family}-{split}"
    return registry.load_dataset(args.data, args.root, split, image_size=args.image_size,
                                 seed=args.data_seed, rotations=rotations,
                                 **folder_kwargs(args))


def _check_flags(args: argparse.Namespace) -> None:
    """Flags that have no effect with the others are refused (one line, exit 2)."""
    defaults = parser_defaults(args.parser)
    data = f"--data {args.data}"
    refuse_inert_flags(args, defaults, [
        ("channels", registry.uses(args.data, "channels"), data),
        ("skip_bad_images", registry.uses(args.data, "skip_bad_images"), data),
        ("data_seed", registry.uses(args.data, "seed"), data),
        ("train_split", args.data == "omniglot" or not args.train_split.startswith("vinyals"),
         f"{data} (the Vinyals split is Omniglot's)"),
        ("image_size", registry.uses(args.data, "image_size"),
         f"{data} (its files keep their own size)"),
        ("profile_warmup", bool(args.profile), "no --profile"),
        ("profile_steps", bool(args.profile), "no --profile"),
        ("emit_nvtx", torch.cuda.is_available(), "no CUDA device (NVTX ranges are CUDA's)"),
        ("allow_changed_settings", bool(args.resume), "no --resume"),
        ("recipe", registry.METHODS[args.method].recipe is not None,
         f"--method {args.method} (recipes are MTL's)"),
        ("root", registry.uses(args.data, "root"), f"{data} (it is generated, not read)"),
        *[(f, args.eval_episodes > 0, "--eval-episodes 0 (no test evaluation)")
          for f in ("eval_seed", "ways", "shots", "queries")],
    ])
    if args.train_split.endswith("trainval") and not args.no_val:
        raise ValueError(f"--train-split {args.train_split} trains on the validation classes "
                         f"too, so validating on them would pick epochs on training classes: "
                         f"add --no-val")
    if args.no_val:
        refuse_inert_flags(args, defaults, [(f, False, "--no-val") for f in
                                            ("val_episodes", "val_ways", "val_shots",
                                             "val_queries", "early_stop_patience",
                                             "val_protocol") if f in defaults])


def _check_files(args: argparse.Namespace, cfg: TrainerConfig) -> None:
    """--out, --plot, --checkpoint-dir and --resume, checked before any data is read."""
    if args.plot:
        checks.writable_file("--plot", args.plot)
    if args.profile:
        checks.writable_dir("--profile", args.profile)
    if cfg.checkpoint_dir:
        checks.writable_dir("--checkpoint-dir", cfg.checkpoint_dir)
    if args.resume:
        state = load_checkpoint(args.resume, method=args.method, training=True,
                                what="--resume")
        spec = state.get("backbone_spec") or {}
        if spec and spec.get("name") != args.backbone:
            raise ValueError(f"--resume {args.resume!r} holds a {spec.get('name')} backbone, "
                             f"not --backbone {args.backbone}")
        if not args.allow_changed_settings:
            check_same_run(state.get("config", {}), cfg, args.resume)


def _run_info(args: argparse.Namespace, train: FewShotDataset) -> dict[str, Any]:
    """What a checkpoint records of its training data, so it can be used alone later."""
    return {"data": args.data, "root": args.root, "image_size": train.image_shape[1],
            "channels": train.channels, "mean": list(train.mean), "std": list(train.std),
            "class_names": list(train.class_names), "data_seed": args.data_seed,
            "train_split": args.train_split, "rotations": args.rotations}


def _load_test(args: argparse.Namespace) -> FewShotDataset:
    """The test split, checked to hold the test episodes before any training."""
    test = _load(args, "test")
    check_fits(test.labels, args.ways, max(args.shots) + args.queries, ways_name="--ways",
               need_name="--shots + --queries", where="test ", class_names=test.class_names)
    return test


def _test_results(args: argparse.Namespace, trainer: Trainer, test: FewShotDataset,
                  train: FewShotDataset) -> dict[str, Any]:
    """The test split with the logistic protocol (a GBML backbone frozen at training
    statistics) and, where the trainer has one, its own adaptation."""
    backbone, norm = frozen_for_eval(trainer.backbone, train)
    rows = evaluate_all(backbone, test, args.shots, args.ways, args.queries,
                        args.eval_episodes, args.eval_seed)
    say(table(rows))
    out: dict[str, Any] = {"results": rows, "batchnorm": norm}
    if trainer.own_adaptation and trainer.supports_ways(args.ways):
        own = [trainer.evaluate(test, n_way=args.ways, k_shot=k, n_query=args.queries,
                                episodes=args.eval_episodes, seed=args.eval_seed,
                                progress=_dist.is_main())
               for k in args.shots]
        for r in own:
            r.pop("accuracies")
        say(f"{args.method} own adaptation:\n" + table(own))
        out["results_own"] = own
    return out


def _fit(args: argparse.Namespace, trainer: Trainer, train: FewShotDataset,
         val: FewShotDataset | None) -> list[dict[str, Any]]:
    callbacks: list[ProfileSteps] = []
    if args.profile and _dist.is_main():
        callbacks.append(ProfileSteps(args.profile, warmup=args.profile_warmup,
                                      steps=args.profile_steps))
    # --emit-nvtx: every autograd op also an NVTX range (Nsight Systems), beside the phases.
    nvtx = torch.autograd.profiler.emit_nvtx() if args.emit_nvtx else contextlib.nullcontext()
    with nvtx:
        history = trainer.fit(train, val, resume=args.resume, callbacks=callbacks,
                              allow_changed_settings=args.allow_changed_settings)
    if callbacks and callbacks[0].written:
        say(f"wrote {' and '.join(callbacks[0].written)} (open trace.json in "
            f"https://ui.perfetto.dev)")
    elif callbacks and callbacks[0].missed:
        say(callbacks[0].missed)
    return history


def cmd_train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _dist.init_from_env()      # under torchrun: join the group before anything else
    _check_flags(args)
    cfg = config_from(args, parser_defaults(args.parser), args.method, args.recipe)
    check_eval_flags(args, "--eval-episodes", allow_zero=True)
    _check_files(args, cfg)
    if args.data_seed is None:
        args.data_seed = 0
    train = _load(args, args.train_split, rotations=args.rotations)
    val = None if args.no_val else _load(args, "val")
    test = _load_test(args) if args.eval_episodes > 0 else None
    say(f"train: {train!r}" + (f"\nval: {val!r}" if val is not None else ""))
    if _dist.is_distributed():
        say(f"distributed: {_dist.world_size()} ranks ({torch.distributed.get_backend()})")
    torch.manual_seed(cfg.seed)          # the backbone's initialization repeats too
    trainer_cls, _, _ = registry.method(args.method)
    trainer = trainer_cls(registry.build_backbone(args.backbone, train.channels), cfg)
    trainer.run_info = _run_info(args, train)
    history = _fit(args, trainer, train, val)
    payload = {"command": command_line(), "method": args.method, "data": args.data,
               "backbone": args.backbone, "rotations": args.rotations,
               "config": dataclasses.asdict(cfg), "history": history,
               "best_epoch": trainer.best_epoch, "train_seconds": time.perf_counter() - t0,
               "machine": machine_info(), "world_size": _dist.world_size()}
    if cfg.checkpoint_dir and _dist.is_main():
        final = os.path.join(cfg.checkpoint_dir, "final.pt")
        atomic_save(trainer.state_dict(), final)
        say(f"wrote {final}")
    if test is not None:
        payload.update(_test_results(args, trainer, test, train))
    payload["total_seconds"] = time.perf_counter() - t0
    write_json(args.out, payload)
    plot_history(args.plot, history, f"{args.method.upper()}, {args.backbone}, {args.data}")
    return 0


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=registry.METHOD_NAMES, default="mtl",
                   help="learner: MTL, or a torch.func baseline from fastmtl.gbml")
    p.add_argument("--data", choices=registry.DATASET_NAMES, default="synthetic",
                   help="data set")
    p.add_argument("--root", default=None, help="folder holding the data set's files")
    p.add_argument("--backbone", choices=registry.BACKBONE_NAMES, default="conv4",
                   help="feature extractor")
    p.add_argument("--train-split", default="train",
                   choices=("train", "trainval", "vinyals-train", "vinyals-trainval"),
                   help="split to train on; vinyals-*: Omniglot's Vinyals split (the "
                        "background and evaluation archives under --root, rotations "
                        "included), validated and tested on vinyals-val / vinyals-test")
    p.add_argument("--rotations", action=argparse.BooleanOptionalAction, default=False,
                   help="rotations by 90/180/270 degrees as new training classes (Omniglot)")
    p.add_argument("--no-val", action="store_true", help="no validation split")
    p.add_argument("--resume", default=None, help="continue from this last.pt checkpoint")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="with --resume: accept settings that differ from the checkpoint's "
                        "(the run is then no longer an exact continuation)")
    add_folder_flags(p)
    p.add_argument("--plot", default=None, help="write a learning-curve PNG here")


def _add_profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write a torch.profiler trace (trace.json, Perfetto) and a table of "
                        "the top operators (top_ops.txt) of a few steps after warm-up here; "
                        "refused before training if the run has fewer steps than that (under "
                        "--max-minutes, which fixes no step count, said after training)")
    p.add_argument("--profile-warmup", type=positive("--profile-warmup", int), default=5,
                   help="steps before profiling starts")
    p.add_argument("--profile-steps", type=positive("--profile-steps", int), default=3,
                   help="steps profiled")
    p.add_argument("--emit-nvtx", action="store_true",
                   help="on CUDA, also an NVTX range per autograd op, for Nsight Systems "
                        "(docs/profiling.md); the named phases are NVTX ranges without it")


def add_parser(sub: argparse._SubParsersAction[Parser], method: str, recipe: str) -> None:
    p = sub.add_parser("train",
                       help="train MTL or a GBML baseline, then evaluate on the test split",
                       description="Train the MTL learner (or, with --method, a GBML baseline); "
                                   "validate each epoch on the val split; evaluate the best "
                                   "epoch on the test split. The settings listed depend on "
                                   "--method (see `fastmtl train --method maml --help`); a "
                                   "setting that has no effect with the others is refused. "
                                   "Under `torchrun --nproc_per_node=N -m fastmtl train ...` "
                                   "it trains data-parallel (DDP; NCCL on GPUs, gloo on "
                                   "CPUs; FASTMTL_DIST_TIMEOUT sets the seconds a rank waits "
                                   "for the others, default 300).",
                       formatter_class=HelpFormatter)
    _add_run_flags(p)
    _add_profile_flags(p)
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the test episodes")
    add_eval_flags(p, "--eval-episodes")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=registry.METHODS["mtl"].recipe,
                   help="MTL settings preset the flags below start from: 'fast' (the "
                        "default: supervised batches over the whole head table) or 'paper' "
                        "(the paper's official code); flags given override it")
    _, config_cls, fixed = registry.method(method)
    defaults = registry.default_config(method, recipe if registry.METHODS[method].recipe
                                       else None)
    add_config_flags(p.add_argument_group(
        f"{method} settings ({config_cls.__module__.rsplit('.', 1)[0]}."
        f"{config_cls.__name__})"), defaults, fixed)
    p.set_defaults(func=cmd_train, parser=p)
