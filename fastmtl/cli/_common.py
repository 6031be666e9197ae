"""What the commands share: output on rank 0, result files, flags built from configs."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .. import checks, registry
from .. import distributed as _dist
from ..checkpoint import atomic_savefig, atomic_write_json
from ..config import TrainerConfig, field_help

if TYPE_CHECKING:  # for the annotations only: evaluate_all imports its modules when run
    from torch import Tensor, nn

    from ..data.base import FewShotDataset


def command_line() -> str:
    """The command as the user typed it, for result files."""
    return " ".join(["fastmtl"] + sys.argv[1:])


def parser_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every flag's default (dest -> value) of a subcommand's parser."""
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def say(*args: object, **kwargs: Any) -> None:
    """print, on rank 0 only (every rank of a distributed run runs the CLI)."""
    if _dist.is_main():
        print(*args, **kwargs)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path or not _dist.is_main():
        return
    atomic_write_json(path, payload)
    say(f"wrote {path}")


def plot_history(path: str | None, history: list[dict[str, Any]], title: str) -> None:
    """The training loss (and validation accuracy) per epoch as a PNG at ``path``."""
    if not path or not history or not _dist.is_main():
        return
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot(ep, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train loss", color="tab:blue")
    if "val_acc" in history[0]:
        ax2 = ax.twinx()
        ax2.errorbar(ep, [h["val_acc"] for h in history], [h["val_ci95"] for h in history],
                     fmt="s-", color="tab:red", capsize=2, label="val acc")
        ax2.set_ylabel("validation accuracy (%)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    say(f"wrote {path}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | accuracy (%) | 95% CI | episodes |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_way']}-way {r['k_shot']}-shot | {r['mean']:.2f} | "
                     f"± {r['ci95']:.2f} | {r['episodes']} |")
    return "\n".join(lines)


def evaluate_all(backbone: nn.Module, test: FewShotDataset, shots: Iterable[int], ways: int,
                 queries: int, episodes: int, seed: int,
                 progress: bool = True, C: float = 3.0,
                 centre: Tensor | None = None, views: bool = False) -> list[dict[str, Any]]:
    """The logistic protocol at each shot; the features embedded once. Give a
    batch-statistics backbone frozen (:func:`frozen_for_eval`)."""
    from ..evaluate import embed, evaluate
    progress = progress and _dist.is_main()
    feats = embed(backbone, test, progress=progress, centre=centre, views=views)
    out = []
    for k in shots:
        r = evaluate(backbone, test, n_way=ways, k_shot=k, n_query=queries, episodes=episodes,
                     seed=seed, features=feats, progress=progress, C=C)
        r.pop("accuracies")
        out.append(r)
    return out


def frozen_for_eval(backbone: nn.Module, train: FewShotDataset,
                    seed: int = 0) -> tuple[nn.Module, str]:
    """The backbone the logistic protocol evaluates, and how it normalizes: a GBML
    backbone (batch statistics) frozen at the statistics of a seeded sample of ``train``,
    as ``fastmtl compare`` does; any other as it is (running statistics)."""
    from ..compare import shared_protocol_backbone, shared_protocol_stats
    return shared_protocol_backbone(backbone, shared_protocol_stats(backbone, train, seed))


# -- config flags -------------------------------------------------------------------------
def add_config_flags(parser: argparse._ActionsContainer, defaults: TrainerConfig,
                     fixed: Collection[str] = ()) -> None:
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
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"fastmtl: {option_string} is deprecated and goes in the next release; use "
              f"{new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "off", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to a flag's help unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def config_from(args: argparse.Namespace, parser_defaults: dict[str, Any], method: str,
                recipe: str) -> TrainerConfig:
    """The config of ``method`` from the flags: the registry's default (MTL: of
    ``recipe``) with the settings the user changed, so only those are checked for effect
    (``TrainerConfig.inert_fields``)."""
    _, config_cls, fixed = registry.method(method)
    changed = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
               if hasattr(args, f.name) and f.name not in fixed
               and getattr(args, f.name) != parser_defaults.get(f.name)}
    cfg = registry.default_config(method, recipe if registry.METHODS[method].recipe else None,
                                  **changed)
    cfg.validate()
    return cfg


def refuse_inert_flags(args: argparse.Namespace, defaults: dict[str, Any],
                       rules: Iterable[tuple[str, bool, str]]) -> None:
    """ValueError for the first flag set away from its default where it has no effect:
    ``rules`` are (dest, active, what disables it) triples."""
    for dest, active, why in rules:
        if not active and getattr(args, dest) != defaults.get(dest):
            raise ValueError(f"--{dest.replace('_', '-')} has no effect with {why}")


def folder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"channels": getattr(args, "channels", 3),
            "skip_bad_images": getattr(args, "skip_bad_images", False)}


def add_folder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", type=int, choices=(1, 3), default=3,
                   help="--data folder: 1 (grey) or 3 (RGB) channels")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="--data folder: leave out unreadable image files (counted) instead "
                        "of stopping")


def check_eval_flags(args: argparse.Namespace, episodes_flag: str, allow_zero: bool) -> None:
    episodes = getattr(args, episodes_flag.lstrip("-").replace("-", "_"))
    if episodes < (0 if allow_zero else 1):
        least = ">= 0 (0 skips evaluation)" if allow_zero else ">= 1"
        raise ValueError(f"{episodes_flag} must be {least}, got {episodes}")
    if any(k < 1 for k in args.shots):
        raise ValueError(f"--shots must be >= 1, got {' '.join(map(str, args.shots))}")
    if args.ways < 2:
        raise ValueError(f"--ways must be >= 2 (one class is no classification), got {args.ways}")
    if args.queries < 1:
        raise ValueError(f"--queries must be >= 1, got {args.queries}")
    check_image_size(args)
    if args.out:
        checks.writable_file("--out", args.out)


def check_image_size(args: argparse.Namespace) -> None:
    """--image-size, where given: at least 8 pixels (Conv-4's four poolings)."""
    if args.image_size is not None and args.image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {args.image_size}")


def positive(name: str, kind: type[int] | type[float] = float) -> Callable[[str], float]:
    """An argparse type: a positive ``kind``, the error naming the flag."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a {kind.__name__}, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_eval_flags(p: argparse.ArgumentParser, episodes_flag: str,
                   zero_skips: bool = True) -> None:
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5],
                   help="k-shot settings to evaluate (default: 1 5)")
    p.add_argument("--ways", type=int, default=5, help="classes per test episode (default: 5)")
    p.add_argument("--queries", type=int, default=15,
                   help="queries per class (default: 15; Omniglot has 20 images a class)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the generated synthetic data, or of the class split of "
                        "--data folder (default: 0, or for eval the checkpoint's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images to this size (default: the data set's own; 28 for "
                        "Omniglot and synthetic)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(episodes_flag, type=int, default=1000,
                   help="test episodes per setting (default: 1000"
                        + ("; 0 skips evaluation)" if zero_skips else ")"))


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastmtl CMD: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


