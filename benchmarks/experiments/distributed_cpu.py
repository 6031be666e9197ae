"""One process vs ``torchrun`` ranks on the CPU (gloo): seconds per training step.

    python benchmarks/experiments/distributed_cpu.py                  # MTL and FO-MAML, 2 ranks
    python benchmarks/experiments/distributed_cpu.py --ranks 2 --steps 30

Runs ``fastmtl train`` on the built-in SyntheticGlyphs (Conv-4, no validation, no test
evaluation) as one process with ``--ranks`` threads, then as ``--ranks`` gloo processes of
one thread each, same flags and seed, and reads the training time each run writes to its
JSON. Both runs compute the same updates (tests/test_distributed.py checks it), so the
ratio is the price or gain of data parallelism on this machine. Results and the machine go
to ``results/distributed_cpu.json``. The first epoch (start-up) is excluded: each run does
one warm-up epoch and the timing is the difference of two runs' ``train_seconds``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import write_result  # noqa: E402

RUNS = {
    "mtl": ["--method", "mtl", "--n-way", "5", "--images-per-class", "10",
            "--tasks-per-step", "8"],
    "fomaml": ["--method", "fomaml", "--n-way", "5", "--k-shot", "1", "--n-query", "15",
               "--tasks-per-step", "8"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_seconds(method: str, ranks: int, steps: int, threads: int, work: Path) -> float:
    per_step = 8
    flags = ["train", "--data", "synthetic", "--no-val", "--eval-episodes", "0",
             "--tasks-per-epoch", str(per_step * steps), "--epochs", "1", "--seed", "0"]
    out = work / f"{method}-{ranks}-{steps}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if ranks == 1:
        cmd = [sys.executable, "-m", "fastmtl"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", "-m", "fastmtl"]
    subprocess.run(cmd + flags + RUNS[method] + ["--out", str(out)], check=True, env=env,
                   cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["train_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="processes (and threads of the single one)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for method in args.methods:
            row = {}
            for ranks, threads, label in ((1, args.ranks, "one_process"),
                                          (args.ranks, 1, "ranks")):
                # Timing of `steps` steps = run with steps + 2 minus run with 2: start-up
                # (data generation, process group, first-step allocation) cancels out.
                long = _train_seconds(method, ranks, args.steps + 2, threads, work)
                short = _train_seconds(method, ranks, 2, threads, work)
                row[label] = {"ranks": ranks, "threads_per_rank": threads,
                              "s_per_step": (long - short) / args.steps}
                print(f"{method:7s} {label:12s} {row[label]['s_per_step'] * 1e3:8.1f} ms/step")
            row["speedup_ranks_vs_one_process"] = (row["one_process"]["s_per_step"]
                                                   / row["ranks"]["s_per_step"])
            print(f"{method:7s} speed-up of {args.ranks} ranks: "
                  f"{row['speedup_ranks_vs_one_process']:.2f}x")
            results[method] = row
    path = write_result("distributed_cpu", {
        "what": "seconds per training step, one process with N threads vs N gloo ranks of "
                "one thread (torchrun), same global batch: 8 tasks of 5-way (MTL: 10 images "
                "a class; FO-MAML: 1 shot + 15 queries), Conv-4 on SyntheticGlyphs 28x28",
        "steps": args.steps, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
