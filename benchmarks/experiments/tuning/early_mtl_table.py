"""Tables of early_mtl.py's runs: each variant's mean over seeds at each time point.

Usage (cwd: the repository root)::

    python benchmarks/experiments/tuning/early_mtl_table.py runs/early_mtl OUT_STEM

writes OUT_STEM.json (every run's rows, and the means) and OUT_STEM.md.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

# What a variant's runs shared the machine with (2026-12-08, 2-core AMD EPYC).
NOTES = {"ema": "these two runs shared the 2 cores with the test suite and with each other, "
                "so they made about half the steps by each time: read their moving averages "
                "against their own live backbone at the same step, not against the other "
                "variants by time. The other variants ran two at a time (seed 0 and 1 side by "
                "side, one thread each) on an otherwise idle machine."}


def means(runs: list[dict]) -> list[dict]:
    """Per time point (the i-th of each run), the mean of every figure over the runs."""
    n = min(len(r["rows"]) for r in runs)
    out = []
    for i in range(n):
        rows = [r["rows"][i] for r in runs]
        out.append({k: round(sum(row[k] for row in rows) / len(rows), 2)
                    for k in rows[0] if all(k in row for row in rows)})
    return out


def markdown(by_label: dict[str, list[dict]], mean: dict[str, list[dict]]) -> str:
    lines = ["# MTL's first two minutes: variants on the validation alphabets", "",
             "Mean of the seeds; 200 validation episodes a point, 5-way, accuracy %, "
             "logistic protocol on L2-normalized / centred (CL2N) features.", ""]
    for label, rows in mean.items():
        r0 = by_label[label][0]
        lines += [f"## {label}: {json.dumps(r0['overrides'])}"
                  + (f", EMA {r0['ema']}" if r0.get("ema") else "")
                  + f" (seeds {sorted(r['seed'] for r in by_label[label])})", ""]
        if label in NOTES:
            lines += [f"Note: {NOTES[label]}", ""]
        keys = [k for k in rows[0] if k not in ("t", "steps")]
        lines += ["| s | steps | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        lines += [f"| {row['t']:.0f} | {row['steps']:.0f} | "
                  + " | ".join(f"{row[k]:.1f}" for k in keys) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    folder, stem = sys.argv[1], sys.argv[2]
    by_label: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, "*_s*.json"))):
        with open(path) as f:
            run = json.load(f)
        by_label[run["label"]].append(run)
    mean = {label: means(runs) for label, runs in by_label.items()}
    with open(stem + ".json", "w") as f:
        json.dump({"runs": by_label, "means": mean}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(by_label, mean))


if __name__ == "__main__":
    main()
