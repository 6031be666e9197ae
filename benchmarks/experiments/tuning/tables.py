"""Tuning tables of a sweep of `fastmtl compare --eval-split val` runs, one per variant.

Each variant run (``OUT/vK/compare.json``) trained every method with that variant's
settings (``tuning/omniglot_background_vK.json`` here; v0: the registry's) for the
same budget and evaluated it on the validation classes. For each method this writes a
table: variant, its settings, steps, and validation accuracy at each evaluation time
(5-way 1- and 5-shot, logistic protocol and the method's own adaptation), and picks the
method's variant by one rule for all: the highest score, the mean over the last two
evaluation times and both shot settings of the better of the two protocols.

Usage:
    python benchmarks/experiments/tuning/tables.py runs/tune_bg --out benchmarks/results/tuning_omniglot_background
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _acc(point: dict[str, Any], shot: str, protocol: str) -> float | None:
    entry = point["accuracy"].get(shot, {}).get(protocol)
    return None if entry is None else entry["mean"]


def score(result: dict[str, Any], shots: list[str]) -> float:
    """Mean over the last two points and ``shots`` of the better protocol's accuracy."""
    vals = []
    for p in result["points"][-2:]:
        for s in shots:
            vals.append(max(a for a in (_acc(p, s, "logistic"), _acc(p, s, "own"))
                            if a is not None))
    return sum(vals) / len(vals)


def tables(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{method: {"rows": [...], "chosen": variant}} from {variant: compare.json}."""
    first = next(iter(runs.values()))
    shots = [str(s) for s in first["shots"]]
    methods = list(first["results"])
    out: dict[str, Any] = {}
    for m in methods:
        rows = []
        for v, payload in runs.items():
            if payload.get("eval_split") != "val":
                raise SystemExit(f"{v}: not a validation run (eval_split "
                                 f"{payload.get('eval_split')!r}); never tune on test")
            r = payload["results"][m]
            rows.append({
                "variant": v, "overrides": payload["settings_overrides"].get(m, {}),
                "steps": r["steps"], "train_seconds": r["train_seconds"],
                "points": [{"train_seconds": p["train_seconds"],
                            **{f"{s}-shot {prot}": _acc(p, s, prot) for s in shots
                               for prot in ("logistic", "own")}} for p in r["points"]],
                "score": score(r, shots)})
        chosen = max(rows, key=lambda row: row["score"])
        out[m] = {"rows": rows, "chosen": chosen["variant"],
                  "chosen_overrides": chosen["overrides"]}
    return out


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = ["# Tuning on the validation alphabets: Omniglot background set", "",
             f"Each variant: one `fastmtl compare --eval-split val` run of all methods, "
             f"{meta['budget_minutes']:g} min of training each, {meta['threads']} torch "
             f"thread(s), seed {meta['seed']}, {meta['episodes']} validation episodes a "
             f"point (5-way, {meta['val_classes']}). Machine: {meta['cpu']}. Accuracy: "
             "logistic protocol / the method's own adaptation (- where it has none). "
             "Score: mean over the last two points and both shot settings of the better "
             "protocol; the highest score is the method's setting in the comparison.", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    for m, t in result.items():
        times = [f"{p['train_seconds']:.0f} s" for p in t["rows"][0]["points"]]
        lines += [f"## {m}", "", "| variant | settings changed | steps | "
                  + " | ".join(f"1-shot {x}" for x in times) + " | "
                  + " | ".join(f"5-shot {x}" for x in times) + " | score |",
                  "|---" * (4 + 2 * len(times)) + "|"]
        for row in t["rows"]:
            def cell(p: dict[str, Any], s: str) -> str:
                own = p[f"{s}-shot own"]
                return f"{p[f'{s}-shot logistic']:.1f} / " + ("-" if own is None else f"{own:.1f}")
            changed = json.dumps(row["overrides"]) if row["overrides"] else "(registry)"
            mark = " **chosen**" if row["variant"] == t["chosen"] else ""
            lines.append(f"| {row['variant']}{mark} | `{changed}` | {row['steps']:,} | "
                         + " | ".join(cell(p, "1") for p in row["points"]) + " | "
                         + " | ".join(cell(p, "5") for p in row["points"])
                         + f" | {row['score']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", help="folder holding one sub-folder per variant (v0, v1, ...)")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--note", default="", help="a line added under the tables' heading")
    ap.add_argument("--tuned", default=os.path.join(HERE, "omniglot_background_tuned.json"),
                    help="where to write the chosen settings (a compare --settings file)")
    args = ap.parse_args()
    runs = {}
    for path in sorted(glob.glob(os.path.join(args.runs, "v*", "compare.json"))):
        with open(path) as f:
            runs[os.path.basename(os.path.dirname(path))] = json.load(f)
    if not runs:
        raise SystemExit(f"no v*/compare.json under {args.runs}")
    result = tables(runs)
    first = next(iter(runs.values()))
    meta = {"budget_minutes": first["budget_minutes"],
            "threads": first["machine"].get("torch_threads"), "seed": first["seed"],
            "episodes": first["episodes"], "cpu": first["machine"].get("cpu"),
            "val_classes": "validation alphabets of the background split", "note": args.note,
            "commands": {v: p["command"] for v, p in runs.items()},
            "machines": {v: p["machine"] for v, p in runs.items()}}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "methods": result}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result, meta))
    tuned = {m: t["chosen_overrides"] for m, t in result.items() if t["chosen_overrides"]}
    with open(args.tuned, "w") as f:
        json.dump(tuned, f, indent=1)
    print(markdown(result, meta))
    print(f"wrote {args.out}.json, .md and {args.tuned}")


if __name__ == "__main__":
    main()
