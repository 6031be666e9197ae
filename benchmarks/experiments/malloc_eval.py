"""Does ``fastmtl eval`` gain from glibc's raised heap thresholds, as training does?

Runs the same ``eval`` command line in fresh processes, alternating the CLI as it is (it calls
``fastmtl.keep_freed_memory(mmap_threshold=1 << 30)`` for every command) with the call
taken out, and records each run's wall, user and system seconds. (The recorded runs
passed ``--out /dev/null``, which replaced the device with a file: ``--out`` now refuses
anything but a regular file, and the script writes none.)

    python benchmarks/experiments/malloc_eval.py --checkpoint runs/background/final.pt \
        -- --centre --views --episodes 100
        # -> benchmarks/results/malloc_eval_cpu.json
    python benchmarks/experiments/malloc_eval.py --checkpoint runs/background/final.pt \
        --pairs 1 --name malloc_eval_20way_cpu -- --centre --views --ways 20 --episodes 100
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import write_result  # noqa: E402

# Runs the CLI as ``python -m fastmtl`` does, with the heap setting kept or made a no-op.
_CHILD = """
import runpy, sys
import fastmtl.cli
if sys.argv[1] == "0":
    fastmtl.cli.keep_freed_memory = lambda **kwargs: False
sys.argv = ["fastmtl", *sys.argv[2:]]
runpy.run_module("fastmtl", run_name="__main__", alter_sys=True)
"""


def _run(keep: bool, argv: list[str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _CHILD, "1" if keep else "0", *argv],
                   check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"keep_freed_memory": keep, "wall_s": round(wall, 2),
            "user_s": round(after.ru_utime - before.ru_utime, 2),
            "sys_s": round(after.ru_stime - before.ru_stime, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint to evaluate")
    p.add_argument("--pairs", type=int, default=2, help="alternating pairs of runs")
    p.add_argument("--name", default="malloc_eval_cpu", help="the result's name")
    p.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then eval's other flags")
    args = p.parse_args()
    rest = args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args
    argv = ["eval", "--checkpoint", args.checkpoint, *rest]      # no --out: nothing written
    runs = []
    for i in range(args.pairs):
        for keep in (False, True):
            runs.append({"pair": i, **_run(keep, argv)})
            print(runs[-1], flush=True)
    path = write_result(args.name, {"what": __doc__.splitlines()[0],
                                            "command": ["fastmtl", *argv], "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
