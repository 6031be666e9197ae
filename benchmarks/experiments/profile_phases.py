"""Where a training step's time goes, per named phase, from `fastmtl train --profile` traces.

Runs `fastmtl train --profile` (a few steps after warm-up, torch.profiler) for MTL with
the fast and the paper recipe and for MAML, ProtoNet and R2D2 on the Omniglot training
alphabets (Conv-4, 28x28), then sums the wall time of each named phase range (``data``,
``backbone``, ``heads``, ``backward``, ``optimizer``; GBML ``inner_loop``, ``outer_loss``,
``outer_backward``; the committed figures predate the split of ``inner_loop_and_outer_loss``) over the profiled steps and divides by the steps. Results:
``benchmarks/results/profile_cpu.json`` and a Markdown table on stdout.

    python benchmarks/experiments/profile_phases.py --root ../shared/data/omniglot
"""
from __future__ import annotations

from pathlib import Path
import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results, test_bench_steps
from _results import write_result  # benchmarks/_results.py

PHASES = ("data", "backbone", "heads", "backward", "optimizer", "inner_loop", "outer_loss",
          "outer_backward")
RUNS = {
    "mtl (fast recipe, 128 images a step)": ["--method", "mtl", "--recipe", "fast"],
    "mtl (paper recipe, 16 x 5-way x 10 = 800 images a step)": [
        "--method", "mtl", "--recipe", "paper", "--tasks-per-epoch", "192"],
    "mtl (earlier README recipe, 2 x 20-way x 10 = 400 images)": [
        "--method", "mtl", "--recipe", "paper", "--head", "cosine", "--scale", "10",
        "--augment", "--n-way", "20", "--tasks-per-step", "2", "--tasks-per-epoch", "24"],
    "maml (4 tasks x 5-way x (1 + 5), 1 inner step)": [
        "--method", "maml", "--tasks-per-step", "4", "--n-query", "5", "--tasks-per-epoch", "80"],
    "protonet (20-way x (1 + 5))": ["--method", "protonet", "--n-way", "20", "--n-query", "5",
                                    "--tasks-per-step", "1", "--tasks-per-epoch", "40"],
    "r2d2 (20-way x (1 + 5))": ["--method", "r2d2", "--n-way", "20", "--n-query", "5",
                                "--tasks-per-step", "1", "--tasks-per-epoch", "40"],
}


def phase_table(trace_path: str, steps: int) -> dict[str, float]:
    """Milliseconds per step of each phase, and of the profiled steps in all."""
    events = json.load(open(trace_path))["traceEvents"]
    total = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in PHASES and e.get("cat") == "user_annotation":
            total[e["name"]] += e["dur"] / 1000.0
    out = {k: v / steps for k, v in total.items()}
    span = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    if span:
        t0 = min(e["ts"] for e in span)
        t1 = max(e["ts"] + e["dur"] for e in span)
        out["_steps_wall_ms"] = (t1 - t0) / 1000.0 / steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.environ.get("FASTMTL_OMNIGLOT", "../shared/data/omniglot"))
    p.add_argument("--steps", type=int, default=5, help="profiled steps per run")
    args = p.parse_args()
    results = {}
    for name, flags in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "fastmtl", "train", "--data", "omniglot", "--root",
                   args.root, "--rotations", "--no-val", "--eval-episodes", "0", "--epochs",
                   "1", "--max-minutes", "2", "--profile", tmp, "--profile-warmup", "5",
                   "--profile-steps", str(args.steps), *flags]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[name] = phase_table(os.path.join(tmp, "trace.json"), args.steps)
        print(name, json.dumps({k: round(v, 1) for k, v in results[name].items()}), flush=True)
    write_result("profile_cpu", {"ms_per_step": results, "steps": args.steps})
    print("\n| run | " + " | ".join(PHASES) + " | step (ms) |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for name, r in results.items():
        wall = r.get("_steps_wall_ms", float("nan"))
        cells = [f"{r[k]:.0f} ({100 * r[k] / wall:.0f}%)" if k in r else "-" for k in PHASES]
        print(f"| {name} | " + " | ".join(cells) + f" | {wall:.0f} |")


if __name__ == "__main__":
    main()
