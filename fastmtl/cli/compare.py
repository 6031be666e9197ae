"""``fastmtl compare`` and ``fastmtl merge``: methods side by side, and the mean of seeds."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Any

import torch

from .. import checks, registry
from .. import compare as cmp
from .._env import machine_info
from ..checkpoint import atomic_write_json, atomic_write_text
from ._common import (
    HelpFormatter,
    Parser,
    add_folder_flags,
    check_image_size,
    command_line,
    folder_kwargs,
    parser_defaults,
    positive,
    refuse_inert_flags,
    say,
)


def _methods(args: argparse.Namespace) -> list[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in registry.METHOD_NAMES]
    if bad or not methods:
        raise ValueError(f"--methods: unknown method(s) {bad}; choose from "
                         f"{','.join(registry.METHOD_NAMES)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods names a method twice: {args.methods}")
    return methods


def _eval_times(args: argparse.Namespace) -> None:
    """--eval-at (times) or --eval-every (a period) into args.eval_every, checked."""
    if args.eval_at:
        if args.eval_every != parser_defaults(args.parser)["eval_every"]:
            raise ValueError("--eval-every has no effect with --eval-at; give one of them")
        try:
            times = [float(t) for t in args.eval_at.split(",") if t.strip()]
        except ValueError:
            raise ValueError(
                f"--eval-at must be comma-separated seconds, got {args.eval_at!r}") from None
        if not times or any(not (0 < t < math.inf) for t in times) or \
                sorted(set(times)) != times:
            raise ValueError(f"--eval-at must be increasing positive seconds, got {args.eval_at!r}")
        if times[0] > 60 * args.budget_minutes:
            raise ValueError(f"--eval-at: the first time ({times[0]:g} s) is past the budget "
                             f"({60 * args.budget_minutes:g} s)")
        args.eval_every = times
    elif args.eval_every > 60 * args.budget_minutes:
        raise ValueError(f"--eval-every ({args.eval_every:g} s) is larger than the budget "
                         f"(--budget-minutes {args.budget_minutes:g} = "
                         f"{60 * args.budget_minutes:g} s)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    if not args.settings:
        return {}
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
    return settings


def _inputs(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """Checks every compare flag and file before any data is read or model trained."""
    methods = _methods(args)
    defaults = parser_defaults(args.parser)
    recipes = any(registry.METHODS[m].recipe for m in methods)
    data = f"--data {args.data}"
    refuse_inert_flags(args, defaults, [
        ("recipe", recipes, "--methods without mtl (recipes are MTL's)"),
        ("sample_images", args.centre or any(registry.METHODS[m].recipe is None
                                             for m in methods),
         "--methods without a GBML baseline and without --centre (nothing is sampled)"),
        ("channels", registry.uses(args.data, "channels"), data),
        ("skip_bad_images", registry.uses(args.data, "skip_bad_images"), data),
        ("data_seed", registry.uses(args.data, "seed"), data),
        ("root", registry.uses(args.data, "root"), f"{data} (it is generated, not read)"),
        ("image_size", registry.uses(args.data, "image_size"),
         f"{data} (its files keep their own size)")])
    _eval_times(args)
    settings = _settings(args)
    unknown = sorted(set(settings) - set(methods))
    if unknown:
        raise ValueError(f"--settings names method(s) {unknown} not in --methods")
    for m in methods:     # unknown fields and bad values fail here, before any data
        cmp.config_for(m, settings.get(m), args.seed, args.budget_minutes,
                       args.recipe if registry.METHODS[m].recipe else None)
    if any(k < 1 for k in args.shots):
        raise ValueError(f"--shots must be positive, got {args.shots}")
    if any(w < 2 for w in args.ways) or len(set(args.ways)) != len(args.ways):
        raise ValueError(f"--ways must be different numbers >= 2, got {args.ways}")
    check_image_size(args)
    if args.sample_images < 2:
        raise ValueError(f"--sample-images must be >= 2 (statistics need two images), got "
                         f"{args.sample_images}")
    if args.episodes < 2:
        raise ValueError(f"--episodes must be >= 2 (a confidence interval needs two), got "
                         f"{args.episodes}")
    checks.writable_dir("--out", args.out)
    return methods, settings


def _payload(args: argparse.Namespace, methods: list[str], settings: dict[str, Any],
             rotations: bool) -> dict[str, Any]:
    from .. import __version__
    return {"command": command_line(), "data": args.data, "root": args.root,
            "image_size": args.image_size, "data_seed": args.data_seed,
            "backbone": args.backbone, "rotations": rotations, "methods": methods,
            "budget_minutes": args.budget_minutes, "eval_every": args.eval_every,
            "shots": list(args.shots), "ways": args.ways[0], "also_ways": args.ways[1:],
            "queries": args.queries, "episodes": args.episodes, "eval_split": args.eval_split,
            "centre": args.centre, "sample_images": args.sample_images,
            # the folder flags where they are read (elsewhere absent: their defaults)
            **({"channels": args.channels, "skip_bad_images": args.skip_bad_images}
               if registry.uses(args.data, "channels") else {}),
            "seed": args.seed, "recipe": args.recipe,
            "settings_overrides": settings, "machine": machine_info(),
            "versions": {"fastmtl": __version__, "torch": torch.__version__}, "results": {}}


def _resumed(json_path: str, payload: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """The finished methods of the run in ``json_path``, if it measured the same thing
    (:data:`fastmtl.compare.COMPARABLE` and the seed); ValueError naming what differs."""
    old = load_json(json_path, "--resume")
    diff = cmp.differences(old, payload, cmp.COMPARABLE + ("seed",))
    if diff:
        what = ", ".join(f"{k}: {cmp.setting(old, k)!r} there, {cmp.setting(payload, k)!r} now"
                         for k in diff)
        raise ValueError(f"--resume: {json_path} holds a comparison with other settings "
                         f"({what})")
    done = {m: r for m, r in old["results"].items() if m in methods}
    say(f"resuming: keeping {', '.join(done) or 'nothing'}")
    if done:     # what ran them, beside this run's command and machine
        payload["resumed_from"] = {"methods": list(done), **{
            k: old.get(k) for k in ("command", "machine", "versions", "centre",
                                   "resumed_from")}}
    plain = [m for m, r in done.items() if r["points"] and not all(
        "centred" in by_shot for p in r["points"] for by_shot in p["accuracy"].values())]
    if payload.get("centre") and plain:
        say(f"--centre: the kept {', '.join(plain)} ran without it: their centred rows are "
            f"missing from the tables")
    per_batch = [m for m, r in done.items() if "shared_protocol_norm" not in r and
                 registry.METHODS[m].recipe is None]        # the GBML methods
    if per_batch:
        say(f"--resume: the kept {', '.join(per_batch)} ran before compare normalized "
            f"batch-statistics backbones with training statistics in the shared protocols: "
            f"their logistic and centred rows used each embedding batch's statistics")
    return done


def cmd_compare(args: argparse.Namespace) -> int:
    methods, settings = _inputs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rotations = args.rotations if args.rotations is not None else args.data == "omniglot"
    opts = dict(image_size=args.image_size, seed=args.data_seed, **folder_kwargs(args))
    train = registry.load_dataset(args.data, args.root, "train", rotations=rotations, **opts)
    test = registry.load_dataset(args.data, args.root, args.eval_split, **opts)
    say(f"train: {train!r}\n{args.eval_split}: {test!r}")
    # --centre: eval --centre's images, the training split without rotations
    centre_from = None if not args.centre else train if not rotations else \
        registry.load_dataset(args.data, args.root, "train", rotations=False, **opts)
    json_path = os.path.join(args.out, "compare.json")
    payload = _payload(args, methods, settings, rotations)
    done = _resumed(json_path, payload, methods) if args.resume and os.path.exists(json_path) \
        else {}

    def save(method: str | None = None, result: dict[str, Any] | None = None) -> None:
        if method is not None:
            payload["results"][method] = result
        payload["results"] = {m: payload["results"][m] for m in methods
                              if m in payload["results"]}
        payload["tables"] = cmp.speedup_tables(payload["results"])
        atomic_write_json(json_path, payload)

    payload["results"].update(done)
    cmp.compare(methods, train, test,
                lambda: registry.build_backbone(args.backbone, train.channels),
                budget_minutes=args.budget_minutes, eval_every=args.eval_every,
                shots=args.shots, ways=args.ways, queries=args.queries,
                episodes=args.episodes, seed=args.seed, settings=settings,
                recipe=args.recipe, centre_from=centre_from,
                sample_images=args.sample_images, done=done,
                on_method_done=save)
    save()
    write_outputs(payload, args.out)
    return 0


def write_outputs(payload: dict[str, Any], out: str) -> None:
    """compare.md and compare.png beside ``out``/compare.json (already written); print the
    Markdown."""
    md = cmp.markdown(payload)
    atomic_write_text(os.path.join(out, "compare.md"), md)
    cmp.plot(payload, os.path.join(out, "compare.png"))
    say(md)
    say(f"wrote {os.path.join(out, 'compare.json')}, compare.md and compare.png in {out}")


def load_json(path: str, flag: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag}: {path} is not readable JSON: {exc}") from None


def cmd_merge(args: argparse.Namespace) -> int:
    payloads: list[dict[str, Any]] = []
    for path in args.runs:
        if not os.path.isfile(path):
            raise ValueError(f"runs: {path!r} is not a file")
        payload = load_json(path, "runs")
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
    except (KeyError, TypeError, AttributeError) as exc:   # a file missing what runs hold
        raise ValueError(f"runs: not complete fastmtl compare.json files "
                         f"({type(exc).__name__}: {exc})") from None
    merged["command"] = command_line()
    merged["runs"] = list(args.runs)
    atomic_write_json(os.path.join(args.out, "compare.json"), merged)
    write_outputs(merged, args.out)
    return 0


def _add_what_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=registry.DATASET_NAMES, default="synthetic",
                   help="data set")
    p.add_argument("--root", default=None, help="folder holding the data set's files")
    p.add_argument("--methods", default=",".join(registry.METHOD_NAMES),
                   help="comma-separated methods, run in this order")
    p.add_argument("--budget-minutes", type=positive("--budget-minutes"), default=5.0,
                   help="training-time budget of each method, in minutes")
    p.add_argument("--eval-every", type=positive("--eval-every"), default=60.0,
                   help="seconds of training between evaluations (the end is evaluated too)")
    p.add_argument("--eval-at", default=None,
                   help="comma-separated training seconds to evaluate at, in place of "
                        "--eval-every (e.g. 10,20,40,80,150,300,600: fine early, sparse late)")
    p.add_argument("--out", default="compare", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of models, tasks and test episodes")
    p.add_argument("--backbone", choices=registry.BACKBONE_NAMES, default="conv4",
                   help="feature extractor")


def _add_test_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="k-shot settings")
    p.add_argument("--ways", type=positive("--ways", int), nargs="+", default=[5],
                   help="classes per test episode; several (e.g. 5 20): each evaluated at "
                        "every point, the first the main setting")
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="the classes evaluated on: test, or val to tune settings (the "
                        "validation alphabets; never tune on test)")
    p.add_argument("--queries", type=positive("--queries", int), default=15,
                   help="queries per class in test episodes")
    p.add_argument("--episodes", type=int, default=300,
                   help="test episodes per shot setting and time point")
    p.add_argument("--centre", action="store_true",
                   help="also evaluate every method by the logistic protocol on features "
                        "centred on the mean feature of --sample-images training images, "
                        "without rotations (protocol 'centred', as `fastmtl eval --centre` "
                        "without --views; off the training clock)")
    p.add_argument("--sample-images", type=positive("--sample-images", int),
                   default=cmp.CENTRE_IMAGES,
                   help="how many seeded training images a batch-statistics (GBML) "
                        "backbone is frozen at in the shared protocols, and --centre "
                        "averages (the same size; without rotations for --centre); fewer "
                        "make each evaluation point cheaper and those statistics noisier "
                        "(>= 2)")


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser("compare", help="time-, FLOP- and memory-to-accuracy of methods",
                       description="Train each method (a fresh backbone each, the same "
                                   "training classes, the same training-time budget, one "
                                   "after another), evaluate every --eval-every seconds of "
                                   "training on the same seeded test episodes (evaluation "
                                   "kept off the training clock), and write compare.json, "
                                   "compare.md (speed-up tables) and compare.png into --out.",
                       formatter_class=HelpFormatter)
    _add_what_flags(p)
    _add_test_flags(p)
    p.add_argument("--threads", type=positive("--threads", int), default=None,
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
    add_folder_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="keep the methods already in --out/compare.json (if it measured the "
                        "same thing: the same settings and seed), run the rest")
    p.set_defaults(func=cmd_compare, parser=p)
    m = sub.add_parser("merge", help="average compare runs that differ only in --seed",
                       description="Average two or more finished `fastmtl compare` runs "
                                   "(the same settings and methods, different --seed) point "
                                   "by point, compute the speed-up tables on the mean curves "
                                   "and list each run's own speed-ups beside them; writes "
                                   "compare.json, compare.md and compare.png into --out.",
                       formatter_class=HelpFormatter)
    m.add_argument("runs", nargs="+", help="compare.json files of the runs")
    m.add_argument("--out", default="compare_merged", help="output folder")
    m.set_defaults(func=cmd_merge, parser=m)
