"""``fastmtl demo | train | eval`` (also ``python -m fastmtl ...``); each subcommand has --help."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from typing import Any

import torch

from . import distributed as _dist
from ._env import keep_freed_memory, machine_info
from .checkpoint import atomic_save, atomic_write_json
from .checkpoint import load as load_checkpoint
from .mtl import RECIPES, MTLConfig

DATASETS = ("synthetic", "omniglot", "miniimagenet", "tieredimagenet", "cifarfs", "fc100")
BACKBONES = ("conv4", "resnet12")
METHODS = ("mtl", "maml", "fomaml", "anil", "r2d2", "protonet")
# Class ranges of the built-in SyntheticGlyphs default (generated, never downloaded):
# classes are a pure function of (seed, class index), so splits are disjoint prefixes.
SYNTHETIC_SPLITS = {"train": (0, 240), "val": (240, 280), "test": (280, 400),
                    "trainval": (0, 280)}


def load_dataset(name: str, root: str | None, split: str, image_size: int | None = None,
                 seed: int = 0, rotations: bool = False):
    """The data set ``name`` (one of DATASETS), split ``train``/``val``/``test``."""
    from . import data
    if name not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {name!r}")
    if name == "synthetic":
        lo, hi = SYNTHETIC_SPLITS[split]
        full = data.SyntheticGlyphs(hi, 20, seed=seed, image_size=image_size or 28)
        ds = full.subset(range(lo, hi), name=f"synthetic-{split}")
    else:
        if root is None:
            raise ValueError(f"--root is required for data {name!r} (the folder holding it)")
        if name == "omniglot":
            ds = data.Omniglot(root, split=split, image_size=image_size or 28)
        else:
            loader = {"miniimagenet": data.MiniImageNet, "tieredimagenet": data.TieredImageNet,
                      "cifarfs": data.CIFARFS, "fc100": data.FC100}[name]
            ds = loader(root, split)
    if rotations:
        ds = data.with_rotations(ds)
    return ds


def build_backbone(name: str, in_channels: int) -> torch.nn.Module:
    from . import models
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    net = getattr(models, name)(in_channels=in_channels)
    net.spec = {"name": name, "in_channels": in_channels}
    return net


def _say(*args, **kwargs) -> None:
    """print, on rank 0 only (every rank of a distributed run runs the CLI)."""
    if _dist.is_main():
        print(*args, **kwargs)


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path or not _dist.is_main():
        return
    atomic_write_json(path, payload)
    _say(f"wrote {path}")


def _plot(path: str | None, history: list[dict[str, Any]], title: str) -> None:
    if not path or not history or not _dist.is_main():
        return
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ep, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("train loss", color="tab:blue")
    if "val_acc" in history[0]:
        ax2 = ax.twinx()
        ax2.errorbar(ep, [h["val_acc"] for h in history], [h["val_ci95"] for h in history],
                     fmt="s-", color="tab:red", capsize=2, label="val acc")
        ax2.set_ylabel("validation accuracy (%)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    _say(f"wrote {path}")


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | accuracy (%) | 95% CI | episodes |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_way']}-way {r['k_shot']}-shot | {r['mean']:.2f} | "
                     f"± {r['ci95']:.2f} | {r['episodes']} |")
    return "\n".join(lines)


def _evaluate_all(backbone, test, shots, ways, queries, episodes, seed, progress=True):
    from .evaluate import embed, evaluate
    progress = progress and _dist.is_main()
    feats = embed(backbone, test, progress=progress)
    out = []
    for k in shots:
        r = evaluate(backbone, test, n_way=ways, k_shot=k, n_query=queries, episodes=episodes,
                     seed=seed, features=feats, progress=progress)
        r.pop("accuracies")
        out.append(r)
    return out


# -- config flags -------------------------------------------------------------------------
def _add_config_flags(parser: argparse.ArgumentParser, defaults, fixed=()) -> None:
    cls = type(defaults)
    hints = typing.get_type_hints(cls)
    doc = cls.__doc__ or ""
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        hint = hints[f.name]
        help_text = _field_help(doc, f.name).replace("%", "%%") + " (default: %(default)s)"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        base = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = base[0] if base else hint
        parser.add_argument(flag, type=_optional(kind) if base else kind, default=default,
                            metavar=kind.__name__.upper(), help=help_text)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _field_help(doc: str, name: str) -> str:
    """The text of ``name`` in a Google-style ``Attributes:`` list: its entry may name
    several fields (``lr, weight_decay: ...``) and continue on more-indented lines."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        head, sep, text = line.strip().partition(":")
        if not sep or name not in [n.strip() for n in head.split(",")]:
            continue
        indent = len(line) - len(line.lstrip())
        parts = [text.strip()]
        for more in lines[i + 1:]:
            if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                break
            parts.append(more.strip())
        return " ".join(p for p in parts if p)
    return name.replace("_", " ")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to a flag's help unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _config_from(args, base, fixed=None):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(base)
              if hasattr(args, f.name)}
    return dataclasses.replace(base, **values, **(fixed or {}))


def _method_config(method: str, recipe: str = "fast"):
    """(trainer class, default config, fixed fields) of ``--method`` (MTL: of ``--recipe``)."""
    if method == "mtl":
        from .mtl import MTLTrainer
        return MTLTrainer, MTLConfig.from_recipe(recipe), {}
    from .gbml import METHODS as GBML
    trainer_cls, config_cls, fixed = GBML[method]
    return trainer_cls, config_cls(), fixed


# -- subcommands --------------------------------------------------------------------------
# The demo uses the recipe that worked best on real Omniglot (see README): 20-way tasks,
# a cosine head with scale 10 and affine augmentation; 50 steps an epoch.
DEMO_CONFIG = MTLConfig(n_way=20, tasks_per_step=2, images_per_class=10, tasks_per_epoch=100,
                        epochs=100, head="cosine", scale=10.0, augment=True, val_episodes=200,
                        max_minutes=2.5)


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    _say("fastmtl demo: MTL with Conv-4 on the built-in SyntheticGlyphs "
          f"(generated, seed {args.seed}), training for at most {args.minutes} min")
    train = load_dataset("synthetic", None, "train", seed=args.seed)
    val = load_dataset("synthetic", None, "val", seed=args.seed)
    test = load_dataset("synthetic", None, "test", seed=args.seed)
    _say(f"train {train.n_classes} classes, val {val.n_classes}, test {test.n_classes} "
          f"(disjoint), {train.image_shape} images")
    cfg = dataclasses.replace(DEMO_CONFIG, max_minutes=args.minutes, seed=args.seed)
    from .mtl import MTLTrainer
    trainer = MTLTrainer(build_backbone("conv4", train.channels), cfg)
    history = trainer.fit(train, val)
    train_s = time.perf_counter() - t0
    rows = _evaluate_all(trainer.backbone, test, (1, 5), 5, 15, args.episodes, args.seed)
    _say(_table(rows))
    payload = {"command": "demo", "data": "synthetic", "backbone": "conv4",
               "config": dataclasses.asdict(cfg), "history": history,
               "best_epoch": trainer.best_epoch, "results": rows,
               "train_seconds": train_s, "total_seconds": time.perf_counter() - t0,
               "machine": machine_info()}
    _write_json(args.out, payload)
    _plot(args.plot, history, "fastmtl demo: MTL, Conv-4, SyntheticGlyphs")
    return 0


def cmd_train(args) -> int:
    t0 = time.perf_counter()
    _dist.init_from_env()      # under torchrun: join the group before anything else
    trainer_cls, defaults, fixed = _method_config(args.method, args.recipe)
    cfg = _config_from(args, defaults, fixed)
    train = load_dataset(args.data, args.root, args.train_split, args.image_size, args.data_seed,
                         rotations=args.rotations)
    val = None if args.no_val else load_dataset(args.data, args.root, "val", args.image_size,
                                                args.data_seed)
    _say(f"train: {train!r}" + (f"\nval: {val!r}" if val is not None else ""))
    if _dist.is_distributed():
        _say(f"distributed: {_dist.world_size()} ranks ({torch.distributed.get_backend()})")
    torch.manual_seed(cfg.seed)          # the backbone's initialization repeats too
    backbone = build_backbone(args.backbone, train.channels)
    trainer = trainer_cls(backbone, cfg)
    history = trainer.fit(train, val, resume=args.resume)
    train_s = time.perf_counter() - t0
    payload = {"command": " ".join(["fastmtl"] + sys.argv[1:]), "method": args.method,
               "data": args.data,
               "backbone": args.backbone, "rotations": args.rotations,
               "config": dataclasses.asdict(cfg), "history": history,
               "best_epoch": trainer.best_epoch, "train_seconds": train_s,
               "machine": machine_info(), "world_size": _dist.world_size()}
    if cfg.checkpoint_dir and _dist.is_main():
        state = dict(trainer.state_dict(), data=args.data, image_size=args.image_size,
                     data_seed=args.data_seed, train_split=args.train_split,
                     rotations=args.rotations)
        final = os.path.join(cfg.checkpoint_dir, "final.pt")
        atomic_save(state, final)
        _say(f"wrote {final}")
    if args.eval_episodes > 0:
        test = load_dataset(args.data, args.root, "test", args.image_size, args.data_seed)
        rows = _evaluate_all(trainer.backbone, test, args.shots, args.ways, args.queries,
                             args.eval_episodes, args.eval_seed)
        _say(_table(rows))
        payload["results"] = rows
        # The method's own test-time adaptation on the same episodes (MAML/ANIL heads are
        # n_way-way, so only at --ways == --n-way).
        if args.method != "mtl" and (args.method not in ("maml", "fomaml", "anil")
                                     or args.ways == cfg.n_way):
            own = [trainer.evaluate(test, n_way=args.ways, k_shot=k, n_query=args.queries,
                                    episodes=args.eval_episodes, seed=args.eval_seed,
                                    progress=_dist.is_main())
                   for k in args.shots]
            for r in own:
                r.pop("accuracies")
            _say(f"{args.method} own adaptation:\n" + _table(own))
            payload["results_own"] = own
    payload["total_seconds"] = time.perf_counter() - t0
    _write_json(args.out, payload)
    _plot(args.plot, history, f"{args.method.upper()}, {args.backbone}, {args.data}")
    return 0


def cmd_eval(args) -> int:
    _dist.init_from_env()      # under torchrun the ranks share the test episodes
    state = load_checkpoint(args.checkpoint, what="--checkpoint")
    spec = state.get("backbone_spec")
    if not spec:
        raise ValueError(f"checkpoint {args.checkpoint!r} does not say which backbone it holds")
    backbone = build_backbone(spec["name"], spec["in_channels"])
    if state.get("batchnorm") == "batch-statistics":     # a GBML checkpoint
        from .gbml import use_batch_stats
        use_batch_stats(backbone)
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {args.checkpoint!r}: its backbone state does not fit "
                         f"{spec}: {str(exc).strip().splitlines()[0]}") from None
    data_name = args.data or state.get("data")
    test = load_dataset(data_name, args.root, args.split, args.image_size or state.get("image_size"),
                        args.data_seed)
    _say(f"eval: {test!r}")
    rows = _evaluate_all(backbone, test, args.shots, args.ways, args.queries, args.episodes,
                         args.seed)
    _say(_table(rows))
    _write_json(args.out, {"command": " ".join(["fastmtl"] + sys.argv[1:]),
                           "checkpoint": args.checkpoint, "data": data_name,
                           "split": args.split, "results": rows, "machine": machine_info()})
    return 0


def _positive(name: str, kind=float):
    """An argparse type: a positive ``kind``, the error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}")
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _compare_inputs(args):
    """Checks every compare flag and file before any data is read or model trained."""
    from . import compare as cmp
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in cmp.METHODS]
    if bad or not methods:
        raise ValueError(f"--methods: unknown method(s) {bad}; choose from "
                         f"{','.join(cmp.METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods names a method twice: {args.methods}")
    if args.eval_at:
        try:
            times = [float(t) for t in args.eval_at.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--eval-at must be comma-separated seconds, got {args.eval_at!r}")
        if not times or any(t <= 0 for t in times) or sorted(set(times)) != times:
            raise ValueError(f"--eval-at must be increasing positive seconds, got {args.eval_at!r}")
        if times[0] > 60 * args.budget_minutes:
            raise ValueError(f"--eval-at: the first time ({times[0]:g} s) is past the budget "
                             f"({60 * args.budget_minutes:g} s)")
        args.eval_every = times
    elif args.eval_every > 60 * args.budget_minutes:
        raise ValueError(f"--eval-every ({args.eval_every:g} s) is larger than the budget "
                         f"(--budget-minutes {args.budget_minutes:g} = "
                         f"{60 * args.budget_minutes:g} s)")
    settings = {}
    if args.settings:
        if not os.path.isfile(args.settings):
            raise ValueError(f"--settings {args.settings!r} is not a file")
        try:
            with open(args.settings) as f:
                settings = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--settings {args.settings!r} is not readable JSON: {exc}") from None
        if not isinstance(settings, dict) or not all(isinstance(v, dict)
                                                     for v in settings.values()):
            raise ValueError(f"--settings {args.settings!r} must map method names to "
                             f"objects of settings")
    if args.recipe == "paper":
        settings["mtl"] = dict(cmp.PAPER_MTL, **settings.get("mtl", {}))
    for m in methods:     # unknown fields and bad values fail here, before any data
        cmp.config_for(m, settings.get(m), args.seed, args.budget_minutes)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a directory")
    os.makedirs(args.out, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        raise ValueError(f"--out {args.out!r} is not writable")
    if any(k < 1 for k in args.shots):
        raise ValueError(f"--shots must be positive, got {args.shots}")
    return methods, settings


def cmd_compare(args) -> int:
    from . import compare as cmp
    methods, settings = _compare_inputs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory(mmap_threshold=1 << 30)
    rotations = args.rotations if args.rotations is not None else args.data == "omniglot"
    train = load_dataset(args.data, args.root, "train", args.image_size, args.data_seed,
                         rotations=rotations)
    test = load_dataset(args.data, args.root, "test", args.image_size, args.data_seed)
    _say(f"train: {train!r}\ntest: {test!r}")
    json_path = os.path.join(args.out, "compare.json")
    payload = {"command": " ".join(["fastmtl"] + sys.argv[1:]), "data": args.data,
               "backbone": args.backbone, "rotations": rotations, "methods": methods,
               "budget_minutes": args.budget_minutes, "eval_every": args.eval_every,
               "shots": list(args.shots), "ways": args.ways, "queries": args.queries,
               "episodes": args.episodes, "seed": args.seed, "recipe": args.recipe,
               "settings_overrides": settings, "machine": machine_info(),
               "versions": {"fastmtl": _version(), "torch": torch.__version__},
               "results": {}}
    done = {}
    if args.resume and os.path.exists(json_path):
        old = cmp_load(json_path)
        same = all(old.get(k) == payload[k] for k in ("data", "backbone", "budget_minutes",
                                                      "eval_every", "shots", "episodes", "seed"))
        if not same:
            raise ValueError(f"--resume: {json_path} holds a comparison with other settings")
        done = {m: r for m, r in old["results"].items() if m in methods}
        _say(f"resuming: keeping {', '.join(done) or 'nothing'}")

    def save(method=None, result=None):
        if method is not None:
            payload["results"][method] = result
        payload["results"] = {m: payload["results"][m] for m in methods
                              if m in payload["results"]}
        payload["tables"] = cmp.speedup_tables(payload["results"])
        atomic_write_json(json_path, payload)

    payload["results"].update(done)
    cmp.compare(methods, train, test, lambda: build_backbone(args.backbone, train.channels),
                budget_minutes=args.budget_minutes, eval_every=args.eval_every,
                shots=args.shots, ways=args.ways, queries=args.queries,
                episodes=args.episodes, seed=args.seed, settings=settings, done=done,
                on_method_done=save)
    save()
    md = cmp.markdown(payload)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(md)
    cmp.plot(payload, os.path.join(args.out, "compare.png"))
    _say(md)
    _say(f"wrote {json_path}, compare.md and compare.png in {args.out}")
    return 0


def cmp_load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--resume: {path} is not readable JSON: {exc}") from None


def _version() -> str:
    from . import __version__
    return __version__


def _add_eval_flags(p, episodes_flag: str) -> None:
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5],
                   help="k-shot settings to evaluate (default: 1 5)")
    p.add_argument("--ways", type=int, default=5, help="classes per test episode (default: 5)")
    p.add_argument("--queries", type=int, default=15,
                   help="queries per class (default: 15; Omniglot has 20 images a class)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the generated synthetic data (default: 0)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images to this size (default: the data set's own; 28 for "
                        "Omniglot and synthetic)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(episodes_flag, type=int, default=1000,
                   help="test episodes per setting (default: 1000; 0 skips evaluation)")


def build_parser(method: str = "mtl", recipe: str = "fast") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmtl", description="Multi-task learning for few-shot classification, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train MTL on built-in synthetic glyphs and evaluate",
                       description="Train MTL (Conv-4) on the built-in SyntheticGlyphs data "
                                   "(generated, no download) and evaluate 5-way 1-/5-shot.")
    p.add_argument("--minutes", type=float, default=2.5, help="training budget (default: 2.5)")
    p.add_argument("--episodes", type=int, default=600,
                   help="test episodes per setting (default: 600)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and episodes")
    p.add_argument("--out", default="demo.json", help="results JSON (default: demo.json)")
    p.add_argument("--plot", default="demo.png", help="learning-curve PNG (default: demo.png)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train MTL or a GBML baseline, then evaluate on the test split",
                       description="Train the MTL learner (or, with --method, a GBML baseline); "
                                   "validate each epoch on the val split; evaluate the best "
                                   "epoch on the test split. The settings listed depend on "
                                   "--method (see `fastmtl train --method maml --help`). "
                                   "Under `torchrun --nproc_per_node=N -m fastmtl train ...` "
                                   "it trains data-parallel (DDP; NCCL on GPUs, gloo on "
                                   "CPUs; FASTMTL_DIST_TIMEOUT sets the seconds a rank waits "
                                   "for the others, default 300).",
                       formatter_class=_HelpFormatter)
    p.add_argument("--method", choices=METHODS, default=method,
                   help="learner: MTL, or a torch.func baseline from fastmtl.gbml")
    p.add_argument("--data", choices=DATASETS, default="synthetic", help="data set")
    p.add_argument("--root", default=None, help="folder holding the data set's files")
    p.add_argument("--backbone", choices=BACKBONES, default="conv4", help="feature extractor")
    p.add_argument("--train-split", default="train", choices=("train", "trainval"),
                   help="split to train on")
    p.add_argument("--rotations", action=argparse.BooleanOptionalAction, default=False,
                   help="rotations by 90/180/270 degrees as new training classes (Omniglot)")
    p.add_argument("--no-val", action="store_true", help="no validation split")
    p.add_argument("--resume", default=None, help="continue from this last.pt checkpoint")
    p.add_argument("--plot", default=None, help="write a learning-curve PNG here")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the test episodes")
    _add_eval_flags(p, "--eval-episodes")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=recipe,
                   help="MTL settings preset the flags below start from: 'fast' (the "
                        "default: supervised batches over the whole head table) or 'paper' "
                        "(the paper's official code); flags given override it")
    _, defaults, fixed = _method_config(method, recipe)
    _add_config_flags(p.add_argument_group(
        f"{method} settings (fastmtl.{'gbml.' if method != 'mtl' else ''}"
        f"{type(defaults).__name__})"), defaults, fixed)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint with the logistic-regression protocol",
                       description="Evaluate a trained backbone: per test episode, fit an "
                                   "L2-regularized logistic regression (C=3) on the support "
                                   "features and report query accuracy, mean and 95% CI.")
    p.add_argument("--checkpoint", required=True, help="a final.pt / best.pt / last.pt file")
    p.add_argument("--data", choices=DATASETS, default=None,
                   help="data set (default: the one the checkpoint was trained on)")
    p.add_argument("--root", default=None, help="folder holding the data set's files")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--seed", type=int, default=0, help="seed of the test episodes")
    _add_eval_flags(p, "--episodes")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="time-, FLOP- and memory-to-accuracy of methods",
                       description="Train each method (a fresh backbone each, the same "
                                   "training classes, the same training-time budget, one "
                                   "after another), evaluate every --eval-every seconds of "
                                   "training on the same seeded test episodes (evaluation "
                                   "kept off the training clock), and write compare.json, "
                                   "compare.md (speed-up tables) and compare.png into --out.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--data", choices=DATASETS, default="synthetic", help="data set")
    p.add_argument("--root", default=None, help="folder holding the data set's files")
    p.add_argument("--methods", default="mtl,maml,fomaml,anil,r2d2,protonet",
                   help="comma-separated methods, run in this order")
    p.add_argument("--budget-minutes", type=_positive("--budget-minutes"), default=5.0,
                   help="training-time budget of each method, in minutes")
    p.add_argument("--eval-every", type=_positive("--eval-every"), default=60.0,
                   help="seconds of training between evaluations (the end is evaluated too)")
    p.add_argument("--eval-at", default=None,
                   help="comma-separated training seconds to evaluate at, in place of "
                        "--eval-every (e.g. 10,20,40,80,150,300,600: fine early, sparse late)")
    p.add_argument("--out", default="compare", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of models, tasks and test episodes")
    p.add_argument("--backbone", choices=BACKBONES, default="conv4", help="feature extractor")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="k-shot settings")
    p.add_argument("--ways", type=_positive("--ways", int), default=5,
                   help="classes per test episode")
    p.add_argument("--queries", type=_positive("--queries", int), default=15,
                   help="queries per class in test episodes")
    p.add_argument("--episodes", type=int, default=300,
                   help="test episodes per shot setting and time point")
    p.add_argument("--threads", type=_positive("--threads", int), default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--settings", default=None,
                   help="JSON file of per-method setting overrides, e.g. "
                        '{"protonet": {"n_way": 60}}')
    p.add_argument("--recipe", choices=("fast", "paper"), default="fast",
                   help="MTL settings: the fast recipe (default) or the paper's")
    p.add_argument("--rotations", action=argparse.BooleanOptionalAction, default=None,
                   help="rotations as new training classes (default: on for Omniglot)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--resume", action="store_true",
                   help="keep the methods already in --out/compare.json, run the rest")
    p.set_defaults(func=cmd_compare)
    return parser


def _method_arg(argv: list[str]) -> tuple[str, str]:
    # The settings flags and their defaults depend on --method and --recipe, so these two
    # are read before the full parse.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=METHODS, default="mtl")
    pre.add_argument("--recipe", choices=tuple(RECIPES), default="fast")
    known, _ = pre.parse_known_args(argv)
    return known.method, known.recipe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(*_method_arg(argv)).parse_args(argv)
    ok = False
    try:
        code = args.func(args)
        ok = True
        return code
    except ValueError as exc:
        print(f"fastmtl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except _dist.DistributedError as exc:
        print(f"fastmtl {args.command}: error: {exc}", file=sys.stderr)
        return 3
    finally:
        # After a failure the other ranks may be gone: no barrier then.
        _dist.shutdown(sync=ok)


if __name__ == "__main__":
    sys.exit(main())
