"""When is fit_logistic faster with the Gram matrix kept as its factor?

``fit_logistic`` solves each episode on its S x S Gram matrix. With many support rows
in few features (``eval --views`` fits 20-way 5-shot heads on 900 rows of 256-d Conv-4
features) a product with the matrix costs more than two with its (S, d + 1) factor, and
forming it is saved too. This times both forms on the same episodes, alternating, at
ratios S / (d + 1) around the switch (``fastmtl.adapt._FACTOR_ROWS``), and records how
far apart their heads are.

Features are shaped like a backbone's views: class means around a shared non-negative
profile, image noise, a smaller noise per view, ReLU, L2 normalization.

    python benchmarks/experiments/adapt_factor.py    # -> results/adapt_factor_cpu.json

With ``--checkpoint`` the episodes are real instead: the checkpoint's test split embedded
with ``--centre --views`` as ``fastmtl eval`` does it, episodes sampled as it samples them
(``-> results/adapt_factor_real_cpu.json``).

    python benchmarks/experiments/adapt_factor.py --checkpoint runs/background/final.pt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fastmtl.adapt as adapt
from fastmtl.sampling import EpisodeSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import keep_freed_memory, write_result  # noqa: E402

# (n_way, shot, views): S = n_way * shot * views support rows
CASES = [(20, 1, 9), (5, 5, 9), (6, 5, 9), (7, 5, 9), (8, 5, 9), (10, 5, 9), (20, 3, 9),
         (20, 4, 9), (20, 5, 9)]
# Real episodes: eval's settings with views, and 20-way 5-shot without them.
REAL_CASES = [(5, 1, 9), (5, 5, 9), (20, 1, 9), (20, 5, 9), (20, 5, 1)]


def _episodes(E: int, n_way: int, shot: int, views: int, d: int,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    profile = torch.rand(d, generator=g)
    means = profile + 0.3 * torch.randn(E, n_way, 1, 1, d, generator=g)
    images = means + 0.5 * torch.randn(E, n_way, shot, 1, d, generator=g)
    z = torch.relu(images + 0.1 * torch.randn(E, n_way, shot, views, d, generator=g))
    z = torch.nn.functional.normalize(z, dim=-1).reshape(E, -1, d)
    y = torch.arange(n_way).repeat_interleave(shot * views).expand(E, -1)
    return z, y


def _real(checkpoint: str, split: str = "test") -> tuple[torch.Tensor, np.ndarray]:
    """The checkpoint's ``split`` embedded as ``eval --centre --views`` embeds it."""
    from fastmtl import registry
    from fastmtl.checkpoint import load
    from fastmtl.classifier import backbone_from_checkpoint
    from fastmtl.evaluate import embed, feature_mean
    state = load(checkpoint, what="--checkpoint")
    run = state["run"]
    backbone = backbone_from_checkpoint(state, checkpoint)
    opts = dict(image_size=run["image_size"], seed=run.get("data_seed", 0),
                channels=run.get("channels", 3))
    train = registry.load_dataset(run["data"], run["root"], "train", **opts)
    test = registry.load_dataset(run["data"], run["root"], split, **opts)
    centre = feature_mean(backbone, train, progress=False)
    return embed(backbone, test, centre=centre, views=True, progress=False), test.labels


def _real_episodes(z: torch.Tensor, labels: np.ndarray, E: int, n_way: int, shot: int,
                   views: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, picked = EpisodeSampler(labels, n_way, shot, 15, 0).episodes(0, E)
    index = torch.as_tensor(picked)[:, :, :shot].reshape(E, -1)
    y = torch.arange(n_way).repeat_interleave(shot * views).expand(E, -1)
    return z[index][:, :, :views].flatten(1, 2), y


def _fit(z: torch.Tensor, y: torch.Tensor, n_way: int,
         factored: bool) -> tuple[adapt.LogisticHeads, float]:
    before = adapt._FACTOR_ROWS, adapt._CHUNK_GRAM_CPU
    # Measured before the CPU chunk bound existed: both forms in the same chunks.
    adapt._FACTOR_ROWS, adapt._CHUNK_GRAM_CPU = (0 if factored else 10**9), 1 << 62
    try:
        start = time.perf_counter()
        heads = adapt.fit_logistic(z, y, C=3.0, n_classes=n_way)
        return heads, time.perf_counter() - start
    finally:
        adapt._FACTOR_ROWS, adapt._CHUNK_GRAM_CPU = before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=100, help="episodes fitted at once")
    p.add_argument("--dim", type=int, default=256, help="feature size d")
    p.add_argument("--repeats", type=int, default=2, help="alternating pairs; the minimum")
    p.add_argument("--checkpoint", help="real episodes: this checkpoint's test split")
    args = p.parse_args()
    keep_freed_memory(mmap_threshold=1 << 30)
    if args.checkpoint:
        feats, labels = _real(args.checkpoint)
        args.dim = feats.shape[-1]
    rows = []
    for n_way, shot, views in (REAL_CASES if args.checkpoint else CASES):
        z, y = (_real_episodes(feats, labels, args.episodes, n_way, shot, views)
                if args.checkpoint else _episodes(args.episodes, n_way, shot, views, args.dim))
        times: dict[bool, list[float]] = {False: [], True: []}
        heads = {}
        for _ in range(args.repeats):
            for factored in (False, True):
                heads[factored], t = _fit(z, y, n_way, factored)
                times[factored].append(t)
        full, fac = min(times[False]), min(times[True])
        dw = float((heads[True].weight - heads[False].weight).norm()
                   / heads[False].weight.norm())
        S = z.shape[1]
        rows.append({"n_way": n_way, "shot": shot, "views": views, "rows": S,
                     "rows_per_feature": round(S / (args.dim + 1), 2),
                     "matrix_s": round(full, 3), "factor_s": round(fac, 3),
                     "speedup_of_factor": round(full / fac, 2),
                     "weight_rel_diff": dw,
                     "factored_by_default": adapt._factored(S, args.dim)})
        print(rows[-1], flush=True)
    path = write_result("adapt_factor_real_cpu" if args.checkpoint else "adapt_factor_cpu", {
        "what": __doc__.splitlines()[0], "episodes": args.episodes, "dim": args.dim,
        "features": (f"{args.checkpoint}'s test split, eval --centre --views" if args.checkpoint
                     else "synthetic (see the script)"),
        "threads": torch.get_num_threads(), "factor_rows": adapt._FACTOR_ROWS,
        "timed": f"fit_logistic, minimum of {args.repeats} alternating runs", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
