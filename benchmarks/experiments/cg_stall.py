"""Does the stalled-CG fix of ``fit_logistic`` (7bb1a9f) cost the hot path anything?

Before the fix, the float32 CG of a Newton step ran on to K * S iterations when its
residual stopped falling, diverged, and on tight 20-way 5-shot episodes returned NaN
heads. This times the solver before (``fastmtl/adapt.py`` at REV, loaded from git) and
after (the working tree), alternating, one torch thread, on:
- the 600 episodes of ``benchmarks/test_bench_adapt.py`` (5-way 1- and 5-shot, 640-d);
- 300 tight 20-way 5-shot episodes, 256-d (the regression test's generator).
Median of three fits each; beside the times: converged and finite counts, and on the
episodes the old solver fitted (converged, finite) whether the new one takes the same
Newton iterations and how far its heads move.

Usage (from the repository root, nothing else running):
    python benchmarks/experiments/cg_stall.py --old 7a3fabe
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from _results import write_result  # noqa: E402
from test_adapt import _tight_episodes  # noqa: E402
from test_bench_adapt import _episodes  # noqa: E402

from fastmtl import adapt as new_adapt  # noqa: E402


def old_module(rev: str) -> ModuleType:
    """fastmtl/adapt.py at ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:fastmtl/adapt.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "adapt_old.py"
    path.write_text(source.replace("from . import checks", "from fastmtl import checks"))
    spec = importlib.util.spec_from_file_location("adapt_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_case(old: ModuleType, z: torch.Tensor, y: torch.Tensor) -> dict:
    times: dict[str, list[float]] = {"old": [], "new": []}
    heads = {}
    for _ in range(3):
        for label, module in (("old", old), ("new", new_adapt)):
            t0 = time.perf_counter()
            heads[label] = module.fit_logistic(z, y)
            times[label].append(time.perf_counter() - t0)
    old_s, new_s = (float(np.median(times[k])) for k in ("old", "new"))
    finite = {k: torch.isfinite(h.weight).all(2).all(1) for k, h in heads.items()}
    healthy = heads["old"].converged & finite["old"]       # what the old solver got right
    same_iter = heads["old"].n_iter[healthy] == heads["new"].n_iter[healthy]
    gap = ((heads["new"].weight - heads["old"].weight)[healthy].norm(dim=(1, 2))
           / heads["old"].weight[healthy].norm(dim=(1, 2)))
    return {"episodes": len(z), "old_s": old_s, "new_s": new_s, "old_over_new": old_s / new_s,
            **{f"{k}_converged": int(h.converged.sum()) for k, h in heads.items()},
            **{f"{k}_finite": int(f.sum()) for k, f in finite.items()},
            "healthy_before": int(healthy.sum()),
            "healthy_same_newton_iterations": int(same_iter.sum()),
            "healthy_max_relative_weight_change": float(gap.max()) if len(gap) else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="git revision of the solver before the fix")
    args = p.parse_args()
    torch.set_num_threads(1)
    old = old_module(args.old)
    cases = {"5w-1s (test_bench_adapt)": _episodes(1)[:2],
             "5w-5s (test_bench_adapt)": _episodes(5)[:2],
             "20w-5s tight, 256-d": _tight_episodes(300, seed=2)[:2]}
    summary = {}
    for name, (z, y) in cases.items():
        summary[name] = time_case(old, z, y)
        print(name, summary[name])
    write_result("adapt_cg_stall_cpu", {"old_revision": args.old, "threads": 1,
                                        "timed": "fit_logistic, median of 3, alternating",
                                        "summary": summary})


if __name__ == "__main__":
    main()
