"""How many episodes should fit_logistic solve at once on a CPU?

``fit_logistic`` splits a call into chunks of at most ``_CHUNK_BYTES`` of support
features and, on a CPU, at most ``_CHUNK_GRAM_CPU`` entries of Gram matrices (or their
factors). In a chunk every episode runs as many Newton and CG iterations as the slowest
one needs, while more episodes a call spread the per-call overhead. This times the
fits of ``fastmtl eval``'s settings (5- and 20-way, 1 and 5 shots, with and without
``--views``, 256-d Conv-4 features) and 5-way fits of 640-d features (ResNet-12's size,
taken as random projections of the same features) at each ``--entries`` bound (0: none,
the 256 MB bound alone, as before), alternating, and records the minimum of the repeats
and how far the heads moved (only by float32 rounding: each episode is solved alone).

    python benchmarks/experiments/adapt_chunk.py --checkpoint runs/background/final.pt
        # -> benchmarks/results/adapt_chunk_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from adapt_factor import _real, _real_episodes

import fastmtl.adapt as adapt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import keep_freed_memory, write_result  # noqa: E402

# (n_way, shot, views, episodes): eval's settings; 20-way 5-shot with views on fewer
CASES = [(5, 1, 1, 1000), (5, 5, 1, 1000), (20, 1, 1, 1000), (20, 5, 1, 1000),
         (5, 1, 9, 1000), (5, 5, 9, 1000), (20, 1, 9, 1000), (20, 5, 9, 200)]
WIDE = [(5, 1, 1, 600), (5, 5, 1, 600)]     # at 640 features


def _fit(z: torch.Tensor, y: torch.Tensor, n_way: int,
         entries: int) -> tuple[adapt.LogisticHeads, float]:
    before = adapt._CHUNK_GRAM_CPU
    adapt._CHUNK_GRAM_CPU = entries or 1 << 62
    try:
        start = time.perf_counter()
        heads = adapt.fit_logistic(z, y, C=3.0, n_classes=n_way)
        return heads, time.perf_counter() - start
    finally:
        adapt._CHUNK_GRAM_CPU = before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="real episodes: its test split")
    p.add_argument("--entries", default="0,2", help="Gram entries a chunk to compare, in "
                   "units of 2^20; 0: no such bound")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the minimum")
    args = p.parse_args()
    keep_freed_memory(mmap_threshold=1 << 30)
    budgets = [int(float(m) * (1 << 20)) for m in args.entries.split(",")]
    feats, labels = _real(args.checkpoint)
    g = torch.Generator().manual_seed(0)
    wide = torch.nn.functional.normalize(
        feats @ torch.randn(feats.shape[-1], 640, generator=g), dim=-1)
    rows = []
    for (n_way, shot, views, episodes), src in [(c, feats) for c in CASES] + \
            [(c, wide) for c in WIDE]:
        z, y = _real_episodes(src, labels, episodes, n_way, shot, views)
        times: dict[int, list[float]] = {b: [] for b in budgets}
        heads = {}
        for _ in range(args.repeats):
            for b in budgets:
                heads[b], t = _fit(z, y, n_way, b)
                times[b].append(t)
        base, new = budgets[0], budgets[-1]
        row = {"n_way": n_way, "shot": shot, "views": views, "episodes": episodes,
               "rows": z.shape[1], "dim": z.shape[2],
               **{f"entries_{b / (1 << 20):g}M_s": round(min(times[b]), 3) for b in budgets},
               "speedup_of_last": round(min(times[base]) / min(times[new]), 2),
               "weight_max_diff": float((heads[new].weight - heads[base].weight).abs().max())}
        rows.append(row)
        print(row, flush=True)
    path = write_result("adapt_chunk_cpu", {
        "what": __doc__.splitlines()[0], "features": f"{args.checkpoint}'s test split, "
        "eval --centre (--views: nine views an image)", "threads": torch.get_num_threads(),
        "default_entries": adapt._CHUNK_GRAM_CPU,
        "timed": f"fit_logistic, minimum of {args.repeats} alternating rounds", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
