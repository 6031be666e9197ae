"""``fastmtl demo | train | eval`` (also ``python -m fastmtl ...``); each subcommand has --help."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
import typing
from typing import Any

import torch

from . import checks
from . import distributed as _dist
from ._env import keep_freed_memory, machine_info
from .checkpoint import atomic_save, atomic_savefig, atomic_write_json, atomic_write_text
from .checkpoint import load as load_checkpoint
from .config import field_help
from .mtl import RECIPES, MTLConfig
from .training import ProfileSteps, TrainingDiverged, TrainingInterrupted

DATASETS = ("synthetic", "omniglot", "folder", "miniimagenet", "tieredimagenet", "cifarfs",
            "fc100")
BACKBONES = ("conv4", "resnet12")
METHODS = ("mtl", "maml", "fomaml", "anil", "r2d2", "protonet")
# Class ranges of the built-in SyntheticGlyphs default (generated, never downloaded):
# classes are a pure function of (seed, class index), so splits are disjoint prefixes.
SYNTHETIC_SPLITS = {"train": (0, 240), "val": (240, 280), "test": (280, 400),
                    "trainval": (0, 280)}


def load_dataset(name: str, root: str | None, split: str, image_size: int | None = None,
                 seed: int = 0, rotations: bool = False, channels: int = 3,
                 skip_bad_images: bool = False):
    """The data set ``name`` (one of DATASETS), split ``train``/``val``/``test``.

    ``folder``: :class:`fastmtl.data.ImageFolder` of ``root`` (one folder per class), split
    by class with ``seed``, ``channels`` 1 or 3, ``image_size`` default 84.
    """
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
        elif name == "folder":
            ds = data.ImageFolder(root, image_size=image_size or 84, channels=channels,
                                  split=split, seed=seed, skip_bad_images=skip_bad_images)
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
    atomic_savefig(fig, path, dpi=120)
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
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        hint = hints[f.name]
        help_text = field_help(cls, f.name).replace("%", "%%") + " (default: %(default)s)"
        if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
            # --flag / --no-flag; an optional bool left out keeps its None (automatic)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        base = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = base[0] if base else hint
        parser.add_argument(flag, type=_optional(kind) if base else kind, default=default,
                            metavar=kind.__name__.upper(), help=help_text)
        for old in [o for o, n in getattr(cls, "_renamed", {}).items() if n == f.name]:
            # The flag's old name, for one release: hidden, it says so, then does the same.
            parser.add_argument("--" + old.replace("_", "-"), dest=f.name,
                                type=_optional(kind) if base else kind, default=default,
                                action=_DeprecatedFlag, help=argparse.SUPPRESS)


class _DeprecatedFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"fastmtl: {option_string} is deprecated and goes in the next release; use "
              f"{new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


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
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    if args.out:
        checks.writable_file("--out", args.out)
    if args.plot:
        checks.writable_file("--plot", args.plot)
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


def _folder_kwargs(args) -> dict[str, Any]:
    return {"channels": getattr(args, "channels", 3),
            "skip_bad_images": getattr(args, "skip_bad_images", False)}


def _add_folder_flags(p) -> None:
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="--data folder: 1 (grey) or 3 (RGB) channels")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="--data folder: leave out unreadable image files (counted) instead "
                        "of stopping")


def _check_eval_flags(args, episodes_flag: str, allow_zero: bool) -> None:
    episodes = getattr(args, episodes_flag.lstrip("-").replace("-", "_"))
    if episodes < (0 if allow_zero else 1):
        raise ValueError(f"{episodes_flag} must be {'>= 0 (0 skips evaluation)' if allow_zero else '>= 1'}"
                         f", got {episodes}")
    if any(k < 1 for k in args.shots):
        raise ValueError(f"--shots must be >= 1, got {' '.join(map(str, args.shots))}")
    if args.ways < 2:
        raise ValueError(f"--ways must be >= 2 (one class is no classification), got {args.ways}")
    if args.queries < 1:
        raise ValueError(f"--queries must be >= 1, got {args.queries}")
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {args.image_size}")
    if args.out:
        checks.writable_file("--out", args.out)


def _check_train_files(args, cfg) -> None:
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
            from .training import check_same_run
            check_same_run(state.get("config", {}), cfg, args.resume)


def _run_info(args, train) -> dict[str, Any]:
    """What a checkpoint records of its training data, so it can be used alone later."""
    return {"data": args.data, "root": args.root, "image_size": train.image_shape[1],
            "channels": train.channels, "mean": list(train.mean), "std": list(train.std),
            "class_names": list(train.class_names), "data_seed": args.data_seed,
            "train_split": args.train_split, "rotations": args.rotations}


def _test_results(args, trainer) -> dict[str, Any]:
    """The test split with the logistic protocol and, for GBML, the method's own."""
    test = load_dataset(args.data, args.root, "test", args.image_size, args.data_seed,
                        **_folder_kwargs(args))
    rows = _evaluate_all(trainer.backbone, test, args.shots, args.ways, args.queries,
                         args.eval_episodes, args.eval_seed)
    _say(_table(rows))
    out = {"results": rows}
    if args.method != "mtl" and trainer.supports_ways(args.ways):
        own = [trainer.evaluate(test, n_way=args.ways, k_shot=k, n_query=args.queries,
                                episodes=args.eval_episodes, seed=args.eval_seed,
                                progress=_dist.is_main())
               for k in args.shots]
        for r in own:
            r.pop("accuracies")
        _say(f"{args.method} own adaptation:\n" + _table(own))
        out["results_own"] = own
    return out


def cmd_train(args) -> int:
    t0 = time.perf_counter()
    _dist.init_from_env()      # under torchrun: join the group before anything else
    trainer_cls, defaults, fixed = _method_config(args.method, args.recipe)
    cfg = _config_from(args, defaults, fixed)
    cfg.validate()
    _check_eval_flags(args, "--eval-episodes", allow_zero=True)
    _check_train_files(args, cfg)
    if args.data_seed is None:
        args.data_seed = 0
    # Freed activation blocks stay in the heap instead of faulting in again each step
    # (measured: one 1,280-image Conv-4 MTL step 2.03 s with glibc's defaults, 1.07 s).
    keep_freed_memory(mmap_threshold=1 << 30)
    train = load_dataset(args.data, args.root, args.train_split, args.image_size, args.data_seed,
                         rotations=args.rotations, **_folder_kwargs(args))
    val = None if args.no_val else load_dataset(args.data, args.root, "val", args.image_size,
                                                args.data_seed, **_folder_kwargs(args))
    _say(f"train: {train!r}" + (f"\nval: {val!r}" if val is not None else ""))
    if _dist.is_distributed():
        _say(f"distributed: {_dist.world_size()} ranks ({torch.distributed.get_backend()})")
    torch.manual_seed(cfg.seed)          # the backbone's initialization repeats too
    backbone = build_backbone(args.backbone, train.channels)
    trainer = trainer_cls(backbone, cfg)
    trainer.run_info = _run_info(args, train)
    callbacks = []
    if args.profile and _dist.is_main():
        callbacks.append(ProfileSteps(args.profile, warmup=args.profile_warmup,
                                      steps=args.profile_steps))
    # --emit-nvtx: every autograd op also an NVTX range (Nsight Systems), beside the phases.
    nvtx = torch.autograd.profiler.emit_nvtx() if args.emit_nvtx and torch.cuda.is_available() \
        else contextlib.nullcontext()
    with nvtx:
        history = trainer.fit(train, val, resume=args.resume, callbacks=callbacks,
                              allow_changed_settings=args.allow_changed_settings)
    if callbacks and callbacks[0].written:
        _say(f"wrote {' and '.join(callbacks[0].written)} (open trace.json in "
             f"https://ui.perfetto.dev)")
    train_s = time.perf_counter() - t0
    payload = {"command": " ".join(["fastmtl"] + sys.argv[1:]), "method": args.method,
               "data": args.data,
               "backbone": args.backbone, "rotations": args.rotations,
               "config": dataclasses.asdict(cfg), "history": history,
               "best_epoch": trainer.best_epoch, "train_seconds": train_s,
               "machine": machine_info(), "world_size": _dist.world_size()}
    if cfg.checkpoint_dir and _dist.is_main():
        state = trainer.state_dict()
        final = os.path.join(cfg.checkpoint_dir, "final.pt")
        atomic_save(state, final)
        _say(f"wrote {final}")
    if args.eval_episodes > 0:
        payload.update(_test_results(args, trainer))
    payload["total_seconds"] = time.perf_counter() - t0
    _write_json(args.out, payload)
    _plot(args.plot, history, f"{args.method.upper()}, {args.backbone}, {args.data}")
    return 0


def cmd_eval(args) -> int:
    _dist.init_from_env()      # under torchrun the ranks share the test episodes
    _check_eval_flags(args, "--episodes", allow_zero=False)
    state = load_checkpoint(args.checkpoint, what="--checkpoint")
    run = state.get("run") or {}
    from .classifier import backbone_from_checkpoint
    backbone = backbone_from_checkpoint(state, args.checkpoint)
    data_name = args.data or run.get("data")
    if data_name is None:
        raise ValueError(f"--checkpoint {args.checkpoint!r} does not record its data set: "
                         f"pass --data (and --root)")
    test = load_dataset(data_name, args.root or run.get("root"), args.split,
                        args.image_size or run.get("image_size"),
                        args.data_seed if args.data_seed is not None else run.get("data_seed", 0),
                        channels=run.get("channels", 3))
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
    if any(k < 1 for k in args.shots):
        raise ValueError(f"--shots must be positive, got {args.shots}")
    if args.episodes < 2:
        raise ValueError(f"--episodes must be >= 2 (a confidence interval needs two), got "
                         f"{args.episodes}")
    if args.ways < 2:
        raise ValueError(f"--ways must be >= 2, got {args.ways}")
    checks.writable_dir("--out", args.out)
    return methods, settings


def cmd_compare(args) -> int:
    from . import compare as cmp
    methods, settings = _compare_inputs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory(mmap_threshold=1 << 30)
    rotations = args.rotations if args.rotations is not None else args.data == "omniglot"
    train = load_dataset(args.data, args.root, "train", args.image_size, args.data_seed,
                         rotations=rotations, **_folder_kwargs(args))
    test = load_dataset(args.data, args.root, "test", args.image_size, args.data_seed,
                        **_folder_kwargs(args))
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
    _write_compare_outputs(payload, args.out)
    return 0


def _write_compare_outputs(payload: dict[str, Any], out: str) -> None:
    """compare.md and compare.png beside ``out``/compare.json (already written); print the
    Markdown."""
    from . import compare as cmp
    md = cmp.markdown(payload)
    atomic_write_text(os.path.join(out, "compare.md"), md)
    cmp.plot(payload, os.path.join(out, "compare.png"))
    _say(md)
    _say(f"wrote {os.path.join(out, 'compare.json')}, compare.md and compare.png in {out}")


def cmd_merge(args) -> int:
    from . import compare as cmp
    payloads = []
    for path in args.runs:
        if not os.path.isfile(path):
            raise ValueError(f"runs: {path!r} is not a file")
        payload = cmp_load(path, flag="runs")
        if not isinstance(payload, dict) or "results" not in payload or "seed" not in payload:
            raise ValueError(f"runs: {path!r} is not a fastmtl compare.json")
        payloads.append(payload)
    checks.writable_dir("--out", args.out)
    try:
        merged = cmp.merge_runs(payloads)
    except ValueError as exc:   # name the files, not the list positions
        raise ValueError("runs: " + re.sub(r"payloads\[(\d+)\]",
                                           lambda m: repr(args.runs[int(m.group(1))]),
                                           str(exc)).removeprefix("payloads: ")) from None
    merged["command"] = " ".join(["fastmtl"] + sys.argv[1:])
    merged["runs"] = list(args.runs)
    atomic_write_json(os.path.join(args.out, "compare.json"), merged)
    _write_compare_outputs(merged, args.out)
    return 0


def cmp_load(path: str, flag: str = "--resume") -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag}: {path} is not readable JSON: {exc}") from None


def _version() -> str:
    from . import __version__
    return __version__


def _adapt_inputs(args):
    """Support classes, query files (and their labels, if a labelled folder) after every check."""
    from .data import class_folders, image_files
    if args.shots is not None and args.shots < 1:
        raise ValueError(f"--shots must be >= 1, got {args.shots}")
    if not os.path.isdir(args.support):
        raise ValueError(f"--support {args.support!r} is not a folder")
    support = class_folders(args.support)
    if len(support) < 2:
        raise ValueError(f"--support {args.support!r} must hold one folder per class, at least "
                         f"2; found {len(support)}")
    empty = [n for n, files in support if not files]
    if empty:
        raise ValueError(f"--support: class folder(s) with no images: {empty[:5]}")
    if args.shots is not None:
        small = [(n, len(f)) for n, f in support if len(f) < args.shots]
        if small:
            raise ValueError(f"--shots {args.shots} is larger than class(es) "
                             + ", ".join(f"{n!r} ({k} images)" for n, k in small[:5]))
    query, truth = [], None
    for q in args.query:
        if os.path.isdir(q):
            labelled = class_folders(q)
            if labelled and any(f for _, f in labelled):
                truth = truth or []
                for name, files in labelled:
                    query += [str(f) for f in files]
                    truth += [name] * len(files)
            else:
                query += [str(f) for f in image_files(q)]
        elif os.path.isfile(q):
            query.append(q)
        else:
            raise ValueError(f"--query {q!r} is neither a file nor a folder")
    if not query:
        raise ValueError(f"--query {' '.join(args.query)!r} holds no images")
    if truth is not None and len(truth) != len(query):
        raise ValueError("--query: give one labelled folder, or unlabelled images only")
    out_ext = os.path.splitext(args.out)[1].lower()
    if out_ext not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {args.out!r}")
    checks.writable_file("--out", args.out)
    if args.plot:
        checks.writable_file("--plot", args.plot)
    return support, query, truth


def cmd_adapt(args) -> int:
    import numpy as np
    support, query, truth = _adapt_inputs(args)
    from .classifier import FewShotClassifier
    clf = FewShotClassifier.from_checkpoint(args.checkpoint, head=args.head)
    rng = np.random.default_rng(args.seed)
    images, labels = [], []
    for name, files in support:
        pick = files if args.shots is None else [files[i] for i in sorted(
            rng.choice(len(files), args.shots, replace=False))]
        images += [str(f) for f in pick]
        labels += [name] * len(pick)
    clf.fit(images, labels)
    proba = clf.predict_proba(query)
    pred = clf.classes_[proba.argmax(1)]
    classes = [str(c) for c in clf.classes_]
    rows = [{"path": q, "predicted": str(p), **{f"p_{c}": float(v) for c, v in zip(classes, pr)}}
            for q, p, pr in zip(query, pred, proba)]
    if truth is not None:
        for r, t in zip(rows, truth):
            r["true"] = t
    if args.out.lower().endswith(".json"):
        atomic_write_json(args.out, {"classes": classes, "support": args.support,
                                     "checkpoint": args.checkpoint, "rows": rows})
    else:
        import csv
        import io
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(args.out, buf.getvalue())
    _say(f"{len(rows)} predictions over {len(classes)} classes "
         f"({len(images)} support images) -> {args.out}")
    if truth is not None:
        unknown = sorted(set(truth) - set(classes))
        acc = float(np.mean([str(p) == t for p, t in zip(pred, truth)])) * 100
        _say(f"accuracy {acc:.2f}% on {len(truth)} labelled query images"
             + (f" ({len(unknown)} query classes not in the support: {unknown[:3]})"
                if unknown else ""))
        index = {c: i for i, c in enumerate(classes)}
        cm = np.zeros((len(classes), len(classes)), dtype=int)
        for p, t in zip(pred, truth):
            if t in index:
                cm[index[t], index[str(p)]] += 1
        _say("confusion (rows: true, columns: predicted):\n" + "\n".join(
            f"{c[:16]:>16s} " + " ".join(f"{v:4d}" for v in row) for c, row in zip(classes, cm)))
        if args.plot:
            _confusion_plot(args.plot, cm, classes, acc)
    return 0


def _confusion_plot(path, cm, classes, acc) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * n, 1.2 + 0.45 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {acc:.1f}%")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    _say(f"wrote {path}")


def _add_eval_flags(p, episodes_flag: str, zero_skips: bool = True) -> None:
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5],
                   help="k-shot settings to evaluate (default: 1 5)")
    p.add_argument("--ways", type=int, default=5, help="classes per test episode (default: 5)")
    p.add_argument("--queries", type=int, default=15,
                   help="queries per class (default: 15; Omniglot has 20 images a class)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the generated synthetic data (default: 0, or for eval the "
                        "checkpoint's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images to this size (default: the data set's own; 28 for "
                        "Omniglot and synthetic)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(episodes_flag, type=int, default=1000,
                   help="test episodes per setting (default: 1000"
                        + ("; 0 skips evaluation)" if zero_skips else ")"))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastmtl CMD: error: ...`` and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_demo_parser(sub) -> None:
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


def _add_train_parser(sub, method, recipe) -> None:
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
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="with --resume: accept settings that differ from the checkpoint's "
                        "(the run is then no longer an exact continuation)")
    _add_folder_flags(p)
    p.add_argument("--plot", default=None, help="write a learning-curve PNG here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write a torch.profiler trace (trace.json, Perfetto) and a table of "
                        "the top operators (top_ops.txt) of a few steps after warm-up here")
    p.add_argument("--profile-warmup", type=_positive("--profile-warmup", int), default=5,
                   help="steps before profiling starts")
    p.add_argument("--profile-steps", type=_positive("--profile-steps", int), default=3,
                   help="steps profiled")
    p.add_argument("--emit-nvtx", action="store_true",
                   help="on CUDA, also an NVTX range per autograd op, for Nsight Systems "
                        "(docs/profiling.md); the named phases are NVTX ranges without it")
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


def _add_eval_parser(sub) -> None:
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
    _add_eval_flags(p, "--episodes", zero_skips=False)
    p.set_defaults(func=cmd_eval)


def _add_compare_parser(sub) -> None:
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
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the synthetic data, or of the class split of --data folder")
    _add_folder_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="keep the methods already in --out/compare.json, run the rest")
    p.set_defaults(func=cmd_compare)


def _add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="average compare runs that differ only in --seed",
                       description="Average two or more finished `fastmtl compare` runs "
                                   "(the same settings and methods, different --seed) point "
                                   "by point, compute the speed-up tables on the mean curves "
                                   "and list each run's own speed-ups beside them; writes "
                                   "compare.json, compare.md and compare.png into --out.",
                       formatter_class=_HelpFormatter)
    p.add_argument("runs", nargs="+", help="compare.json files of the runs")
    p.add_argument("--out", default="compare_merged", help="output folder")
    p.set_defaults(func=cmd_merge)


def _add_adapt_parser(sub) -> None:
    p = sub.add_parser("adapt", help="fit a head on a few labelled images, classify new ones",
                       description="Load a trained checkpoint, fit the paper's test-time head "
                                   "(logistic regression, C=3) on --support (one folder per "
                                   "new class), and classify --query images; writes one row "
                                   "per query (path, predicted class, probability of each "
                                   "class) as CSV or JSON. With a labelled --query folder "
                                   "(one folder per class) it also prints the accuracy and "
                                   "a confusion matrix (--plot PNG).",
                       formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a fastmtl final.pt / best.pt / last.pt")
    p.add_argument("--support", required=True, help="folder with one sub-folder per class")
    p.add_argument("--query", required=True, nargs="+",
                   help="image files, a folder of images, or a labelled folder of class folders")
    p.add_argument("--out", default="predictions.csv", help="predictions, .csv or .json")
    p.add_argument("--shots", type=int, default=None,
                   help="use this many support images a class (seeded choice; default all)")
    p.add_argument("--head", choices=("logistic", "prototype"), default="logistic",
                   help="the new head: the paper's logistic regression or nearest prototype")
    p.add_argument("--plot", default=None, help="confusion-matrix PNG (labelled --query)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --shots choice")
    p.set_defaults(func=cmd_adapt)


def build_parser(method: str = "mtl", recipe: str = "fast") -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastmtl", description="Multi-task learning for few-shot classification, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(sub)
    _add_train_parser(sub, method, recipe)
    _add_eval_parser(sub)
    _add_compare_parser(sub)
    _add_merge_parser(sub)
    _add_adapt_parser(sub)
    return parser


def _resume_hint(args, argv: list[str], exc) -> str:
    """The command that continues an interrupted run, or why there is none."""
    if args.command == "compare":
        return (f"methods finished so far are in {os.path.join(args.out, 'compare.json')}; "
                f"continue with: fastmtl {' '.join(_without(argv, '--resume', 0))} --resume")
    if exc.checkpoint is None:
        return "to be able to resume, pass --checkpoint-dir"
    rest = _without(argv, "--resume", 1)
    rest = _without(rest, "--allow-changed-settings", 0)
    return f"continue with: fastmtl {' '.join(rest)} --resume {exc.checkpoint}"


def _without(argv: list[str], flag: str, values: int) -> list[str]:
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a == flag:
            skip = values
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _method_arg(argv: list[str]) -> tuple[str, str]:
    # The settings flags and their defaults depend on --method and --recipe, so these two
    # are read before the full parse.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=METHODS, default="mtl")
    pre.add_argument("--recipe", choices=tuple(RECIPES), default="fast")
    known, _ = pre.parse_known_args(argv)
    return known.method, known.recipe


def _dispatch(args, argv: list[str]) -> tuple[int, bool]:
    """(exit code, whether the command returned normally) of ``args``' command."""
    try:
        return args.func(args), True
    except ValueError as exc:
        print(f"fastmtl {args.command}: error: {exc}", file=sys.stderr)
        return 2, False
    except _dist.DistributedError as exc:
        print(f"fastmtl {args.command}: error: {exc}", file=sys.stderr)
        return 3, False
    except TrainingDiverged as exc:
        print(f"fastmtl {args.command}: error: {exc}", file=sys.stderr)
        return 4, False
    except TrainingInterrupted as exc:
        if _dist.is_main():
            print(f"fastmtl {args.command}: {exc}; " + _resume_hint(args, argv, exc),
                  file=sys.stderr)
        return exc.exit_code, False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(*_method_arg(argv)).parse_args(argv)
    # The process leaves with os._exit below only if the command itself joined the group
    # (a torchrun launch of the CLI), never inside a caller that made its own group.
    ours = not _dist.is_distributed()
    ok, distributed = False, False
    try:
        code, ok = _dispatch(args, argv)
    finally:
        try:
            distributed = ours and _dist.is_distributed()
        except Exception:       # a broken group: still leave it below
            distributed = ours
        # After a failure the other ranks may be gone: no barrier then.
        _dist.shutdown(sync=ok)
    if distributed:
        # A rank of a torchrun launch leaves without the interpreter's teardown: with the
        # process group already destroyed, what is left of gloo and its TCP store can still
        # abort the process at exit ("terminate called without an active exception", seen
        # once in 21 two-rank runs of tests/test_distributed.py), after every result was
        # written. Every output file is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
