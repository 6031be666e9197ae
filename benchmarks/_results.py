"""Where benchmark results go: ``benchmarks/results/<name>.json`` with the machine named."""
from __future__ import annotations

import json
from pathlib import Path

from fastmtl._env import keep_freed_memory, machine_info

RESULTS = Path(__file__).parent / "results"

__all__ = ["RESULTS", "keep_freed_memory", "machine_info", "record", "write_result",
           "evaluate_shots"]


def evaluate_shots(backbone, test, shots, ways, queries, episodes, seed, progress=True):
    """fastmtl.evaluate at each of ``shots`` on one embedding of ``test`` (as the CLI
    reports a test split): a result dict per shot, without the per-episode accuracies."""
    from fastmtl.evaluate import embed, evaluate
    feats = embed(backbone, test, progress=progress)
    out = []
    for k in shots:
        r = evaluate(backbone, test, n_way=ways, k_shot=k, n_query=queries, episodes=episodes,
                     seed=seed, features=feats, progress=progress)
        r.pop("accuracies")
        out.append(r)
    return out


def write_result(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json``: ``{"name", "machine", **payload}``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"name": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def record(store: dict, name: str, benchmark, **extra) -> None:
    """Put a pytest-benchmark fixture's timings (seconds) and ``extra`` in ``store[name]``."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:                # --benchmark-disable: nothing was timed
        return
    store[name] = {"median_s": stats.median, "min_s": stats.min, "mean_s": stats.mean,
                   "rounds": stats.rounds, **extra}
