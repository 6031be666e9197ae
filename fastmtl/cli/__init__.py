"""``fastmtl demo | train | eval | compare | merge | adapt`` (also ``python -m fastmtl``).

One module a command (its flags, checks and work), flags shared in ``_common``. Nothing
outside this package imports from it; ``main`` is the console entry point.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import __version__, registry
from .. import distributed as _dist
from .._env import keep_freed_memory
from ..mtl import RECIPES
from ..training import TrainingDiverged, TrainingInterrupted
from . import adapt, compare, demo, train
from . import eval as eval_
from ._common import Parser

__all__ = ["main", "build_parser"]


def build_parser(method: str = "mtl", recipe: str = "fast") -> argparse.ArgumentParser:
    """The parser of every command; ``fastmtl train``'s settings flags are those of
    ``method`` (and, for MTL, their defaults ``recipe``'s)."""
    parser = Parser(
        prog="fastmtl", description="Multi-task learning for few-shot classification, fast.")
    parser.add_argument("--version", action="version", version=f"fastmtl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    train.add_parser(sub, method, recipe)
    eval_.add_parser(sub)
    compare.add_parsers(sub)
    adapt.add_parser(sub)
    return parser


def _resume_hint(args: argparse.Namespace, argv: list[str], exc: TrainingInterrupted) -> str:
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
    pre.add_argument("--method", choices=registry.METHOD_NAMES, default="mtl")
    pre.add_argument("--recipe", choices=tuple(RECIPES), default=registry.METHODS["mtl"].recipe)
    known, _ = pre.parse_known_args(argv)
    return known.method, known.recipe


def _dispatch(args: argparse.Namespace, argv: list[str]) -> tuple[int, bool]:
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
    # Subnormal floats (weights that weight decay drives towards 0) make x86 arithmetic
    # about 10x slower: a 30-minute Conv-4 run with --weight-decay 5e-4 slowed from 36 s to
    # 292 s an epoch. Flushing them to zero must come before torch starts its thread pool,
    # whose threads inherit it (denormal_flush_cpu.json); a caller's flag is given back.
    flush = _flush_denormals()
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    finally:
        torch.set_flush_denormal(flush)


def _flush_denormals() -> bool:
    """Turns flushing of subnormal floats on; returns what it was (False where the CPU
    cannot flush)."""
    on = torch.tensor([1e-40], dtype=torch.float32).item() == 0.0
    torch.set_flush_denormal(True)
    return on


def _main(argv: list[str]) -> int:
    args = build_parser(*_method_arg(argv)).parse_args(argv)
    # Freed activation blocks stay in the heap instead of faulting in again each batch, in
    # every command: one 1,280-image Conv-4 MTL step took 2.03 s with glibc's defaults,
    # 1.07 s so; a 100-episode `eval --centre --views` on the background set 20.3 / 22.1 s,
    # 14.3 / 13.4 s (10.6 / 15.3 s of it in the kernel, paging freed blocks back in;
    # 0.5 / 0.4 s so: malloc_eval_cpu.json).
    keep_freed_memory(mmap_threshold=1 << 30)
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
