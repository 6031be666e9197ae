"""Does a script using the Python API get the CLI's speed? The CLI raises glibc's heap
thresholds (``fastmtl.keep_freed_memory``); the API leaves the process as it is. Runs
MTL (the default recipe) on the Omniglot subsets for ``--seconds`` of training through
the API, in fresh processes alternating with and without the call, and records the
steps made by 15 s and by the end.

    python benchmarks/experiments/malloc_api.py --root ../shared/data/omniglot
        # -> benchmarks/results/malloc_api_cpu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import write_result  # noqa: E402

_CHILD = """
import json, sys, torch, fastmtl
from fastmtl.training import Callback
if sys.argv[2] == "1":
    fastmtl.keep_freed_memory(mmap_threshold=1 << 30)
train = fastmtl.registry.load_dataset("omniglot", sys.argv[1], "train", rotations=True)
seconds = float(sys.argv[3])
cfg = fastmtl.registry.default_config("mtl", max_minutes=seconds / 60, epochs=10**6)
seen = {}
class At15(Callback):
    def on_step_end(self, trainer, state):
        if state.train_seconds <= 15.0:
            seen["at15"] = state.step
cb = At15()
torch.manual_seed(0)
trainer = fastmtl.MTLTrainer(fastmtl.models.conv4(), cfg)
hist = trainer.fit(train, progress=False, callbacks=[cb])
print(json.dumps({"steps_15s": seen.get("at15"), "steps": sum(h["steps"] for h in hist)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="the Omniglot subsets' folder")
    p.add_argument("--seconds", type=float, default=30.0, help="training seconds a run")
    p.add_argument("--pairs", type=int, default=2, help="alternating pairs of runs")
    args = p.parse_args()
    runs = []
    for i in range(args.pairs):
        for keep in ("0", "1"):
            out = subprocess.run([sys.executable, "-c", _CHILD, args.root, keep,
                                  str(args.seconds)], capture_output=True, text=True,
                                 check=True).stdout
            runs.append({"keep_freed_memory": keep == "1", "pair": i,
                         **json.loads(out.strip().splitlines()[-1])})
            print(runs[-1], flush=True)
    path = write_result("malloc_api_cpu", {"what": __doc__.splitlines()[0],
                                           "seconds": args.seconds, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
