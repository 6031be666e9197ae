"""Does 32-pixel Omniglot (MTL's documented recipe) change the race? Every method at 32 px.

MTL's recipe variants picked ``--image-size 32`` (Conv-4 then keeps a 2x2 map, 256-d
features, where 28 px pools to 1x1, 64-d), but the tuned comparison runs every method at
the data set's 28 px. This puts one ``fastmtl compare --eval-split val --image-size 32``
run of all five methods with their tuned settings (the sweep's protocol: 3 minutes each,
one thread, seed 0, 200 validation episodes a point) beside each method's chosen row of
the 28-px sweep (``tuning_omniglot_background.json``), on the validation alphabets only.

Usage:
    python benchmarks/experiments/tuning/image_size.py runs/tune_bg32/tuned32/compare.json \
        --out benchmarks/results/tuning_omniglot_background_size32
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from tables import tables

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results")


def _cell(point: dict[str, Any], shot: str) -> str:
    own = point[f"{shot}-shot own"]
    return f"{point[f'{shot}-shot logistic']:.1f} / " + ("-" if own is None else f"{own:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="compare.json of the 32-px validation run")
    ap.add_argument("--sweep", default=os.path.join(RESULTS, "tuning_omniglot_background.json"),
                    help="the 28-px sweep's tables")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--note", default="", help="a paragraph under the heading")
    args = ap.parse_args()
    with open(args.run) as f:
        run = json.load(f)
    if run.get("eval_split") != "val" or run.get("image_size") != 32:
        raise SystemExit(f"{args.run}: not a 32-px validation run; never tune on test")
    with open(args.sweep) as f:
        sweep = json.load(f)["methods"]
    size32 = tables({"size32": run})
    rows: dict[str, Any] = {}
    for m, t in size32.items():
        chosen = next(r for r in sweep[m]["rows"] if r["variant"] == sweep[m]["chosen"])
        rows[m] = {"28 px (chosen row of the sweep)": chosen, "32 px": t["rows"][0]}
    times = [f"{p['train_seconds']:.0f} s" for p in size32["mtl"]["rows"][0]["points"]]
    lines = ["# Every method at 32 px: the validation alphabets, Omniglot background set", "",
             "One `fastmtl compare --eval-split val --image-size 32` run of all methods with "
             "their tuned settings, beside each method's chosen row of the 28-px sweep "
             f"(`tuning_omniglot_background.md`): {run['budget_minutes']:g} min each, "
             f"{run['machine'].get('torch_threads')} torch thread, seed {run['seed']}, "
             f"{run['episodes']} validation episodes a point, 5-way. Accuracy: logistic "
             "protocol / own adaptation. Machine: " + str(run["machine"].get("cpu")) + ".", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| method | images | steps | " + " | ".join(f"1-shot {x}" for x in times)
              + " | " + " | ".join(f"5-shot {x}" for x in times) + " | score |",
              "|---" * (4 + 2 * len(times)) + "|"]
    for m, pair in rows.items():
        for label, r in pair.items():
            lines.append(f"| {m} | {label} | {r['steps']:,} | "
                         + " | ".join(_cell(p, "1") for p in r["points"]) + " | "
                         + " | ".join(_cell(p, "5") for p in r["points"])
                         + f" | {r['score']:.2f} |")
    with open(args.out + ".json", "w") as f:
        json.dump({"command": run["command"], "machine": run["machine"], "note": args.note,
                   "methods": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
