"""How tight must the evaluation's logistic fits be? Time and predictions by tolerance.

``fit_logistic`` stops at a gradient norm of ``tol`` in scikit-learn's units (the objective
divided by C S); scikit-learn's own default stops at a largest gradient entry of 1e-4 in
the same units, so any ``tol`` at or below 1e-4 (a Euclidean norm bounds every entry)
solves at least as tightly as the paper's protocol. This fits the episodes of ``fastmtl
eval --centre --views`` (5- and 20-way, 1 and 5 shots, nine views an image) on the
validation split of a checkpoint at each tolerance, alternating, and records the minimum
time of the repeats, the accuracy and how many query predictions differ from the
tightest tolerance's.

    python benchmarks/experiments/eval_tol.py --checkpoint runs/background/final.pt
        # -> benchmarks/results/eval_tol_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from adapt_factor import _real

from fastmtl.adapt import fit_logistic
from fastmtl.sampling import EpisodeSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import keep_freed_memory, write_result  # noqa: E402

# (n_way, shot, episodes): eval's settings, 20-way 5-shot on fewer episodes (its fits cost)
CASES = [(20, 5, 200), (20, 1, 500), (5, 5, 500), (5, 1, 500)]


def _case(z: torch.Tensor, labels: np.ndarray, n_way: int, shot: int, episodes: int,
          tols: list[float], repeats: int) -> list[dict]:
    _, picked = EpisodeSampler(labels, n_way, shot, 15, 0).episodes(0, episodes)
    index = torch.as_tensor(picked)
    views = z.shape[1]
    zs = z[index[:, :, :shot].reshape(episodes, -1)].flatten(1, 2)
    ys = torch.arange(n_way).repeat_interleave(shot * views).expand(episodes, -1)
    zq = F.normalize(z[index[:, :, shot:].reshape(episodes, -1)].mean(2), dim=-1)
    yq = torch.arange(n_way).repeat_interleave(15)
    times: dict[float, list[float]] = {t: [] for t in tols}
    pred = {}
    for _ in range(repeats):
        for t in tols:
            start = time.perf_counter()
            heads = fit_logistic(zs, ys, C=3.0, n_classes=n_way, tol=t)
            times[t].append(time.perf_counter() - start)
            pred[t] = heads.predict(zq)
    tight = min(tols)
    return [{"n_way": n_way, "shot": shot, "episodes": episodes, "rows": zs.shape[1],
             "tol": t, "fit_s": round(min(times[t]), 3),
             "speedup_vs_tightest": round(min(times[tight]) / min(times[t]), 2),
             "accuracy": round(float((pred[t] == yq).double().mean()) * 100, 4),
             "queries": pred[t].numel(),
             "predictions_differing": int((pred[t] != pred[tight]).sum())} for t in tols]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="its validation split is fitted")
    p.add_argument("--split", default="val", help="the split (never tune on test)")
    p.add_argument("--tols", default="1e-7,1e-6,1e-5,1e-4", help="comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the minimum")
    args = p.parse_args()
    keep_freed_memory(mmap_threshold=1 << 30)
    tols = sorted(float(t) for t in args.tols.split(","))
    z, labels = _real(args.checkpoint, args.split)
    rows = []
    for n_way, shot, episodes in CASES:
        for row in _case(z, labels, n_way, shot, episodes, tols, args.repeats):
            rows.append(row)
            print(row, flush=True)
    path = write_result("eval_tol_cpu", {
        "what": __doc__.splitlines()[0], "checkpoint": args.checkpoint, "split": args.split,
        "features": "eval --centre --views (nine views an image; queries the normalized "
                    "mean of their views)", "threads": torch.get_num_threads(),
        "timed": f"fit_logistic, minimum of {args.repeats} alternating rounds", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
